"""Training data: source → captions → transforms → buckets → DataLoader (see
docs/architecture.md for the contract)."""

from runner.data.cache import TensorCache, cache_namespace, content_hash, open_run_cache
from runner.data.loader import (
    PreflightReport,
    ResumableLoader,
    build_train_dataloader,
    cache_batches,
    default_placeholder_text,
    preflight,
)

__all__ = [
    "PreflightReport",
    "ResumableLoader",
    "TensorCache",
    "build_train_dataloader",
    "cache_batches",
    "cache_namespace",
    "content_hash",
    "default_placeholder_text",
    "open_run_cache",
    "preflight",
]
