"""kubetune launcher: validate configs, render and submit training Jobs, follow runs.

Must stay light: importing it never imports torch, diffusers, transformers, peft or accelerate.
"""

__version__ = "0.1.0"
