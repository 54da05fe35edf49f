"""kubetune runner: the training entrypoint that runs inside the Job's pod (or locally).

Importing this package must stay light: the launcher imports ``kubetune.config`` and
``kubetune.errors``; heavy modules (torch, diffusers) are imported only by the training code.
"""

__version__ = "0.1.0"
