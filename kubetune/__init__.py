"""kubetune's torch-free core, imported by both the launcher and the pod's runner.

Everything both processes must agree on lives here and nowhere else: the config schema
(`kubetune.config`), the exception hierarchy and exit codes (`kubetune.errors`), the run
layout and the progress record (`kubetune.layout`), the storage protocol and its backends
(`kubetune.storage`), the checkpoint manifest and publisher (`kubetune.checkpoint`) and what
can be learnt about a dataset without torch (`kubetune.dataset`: sources, index, header
preflight). Nothing in this package imports torch, diffusers or kubernetes;
`tests/test_kubetune/test_import_boundary.py` keeps it so.
"""
