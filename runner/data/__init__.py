"""Training data, the torch side: captions → transforms → buckets → resumable DataLoader (see
docs/architecture.md for the contract). Sources, the index and the preflight are
`kubetune.dataset`'s.

The torch-free pieces (`preflight`, `verify_data`, the dataset index) import without torch;
the loader and the tensor cache are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "PreflightReport": "kubetune.dataset.preflight",
    "preflight": "kubetune.dataset.preflight",
    "verify_data": "kubetune.dataset.preflight",
    "DataIndex": "kubetune.dataset.index",
    "ResumableLoader": "runner.data.loader",
    "build_train_dataloader": "runner.data.loader",
    "cache_batches": "runner.data.loader",
    "LoaderSettings": "runner.data.loader_settings",
    "TensorCache": "runner.data.cache",
    "cache_namespace": "runner.data.cache",
    "content_hash": "runner.data.cache",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'runner.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
