"""TensorCache: per-example tensors (VAE latents, text embeddings) on local disk, optionally
mirrored to an ObjectStore so a restarted pod does not recompute them.

An entry's key hashes the example's content (image bytes, transformed pixels or caption text)
together with the cache's namespace (model identity + transform parameters + kind), so
changing any of them reads a different entry: stale tensors are never returned.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from kubetune.storage import ObjectStore
from kubetune.storage.local import temp_file_beside

Tensors = dict[str, torch.Tensor]


def content_hash(content: bytes | str | torch.Tensor) -> str:
    """sha256 of bytes, UTF-8 text, or a tensor's dtype, shape and values."""
    digest = hashlib.sha256()
    if isinstance(content, torch.Tensor):
        tensor = content.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    elif isinstance(content, str):
        digest.update(content.encode("utf-8"))
    else:
        digest.update(content)
    return digest.hexdigest()


class TensorCache:
    """Tensors per example under `local_dir/<namespace>/`, mirrored to `mirror/<namespace>/`.

    `namespace` holds everything besides the example that determines the tensors, e.g.
    `{"kind": "vae", "model": "repo@rev", "transform": {...}, "resolution": [512, 512]}`.
    """

    def __init__(
        self, local_dir: str | Path, namespace: dict[str, Any], mirror: ObjectStore | None = None
    ) -> None:
        canonical = json.dumps(namespace, sort_keys=True, separators=(",", ":"), default=str)
        self.namespace_id = hashlib.sha256(canonical.encode()).hexdigest()[:16]
        self.dir = Path(local_dir) / self.namespace_id
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "namespace.json").write_text(canonical)
        self.mirror = mirror

    def key(self, content: bytes | str | torch.Tensor) -> str:
        return content_hash(content)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.safetensors"

    def _remote(self, key: str) -> str:
        return f"{self.namespace_id}/{key[:2]}/{key}.safetensors"

    def get(self, key: str) -> Tensors | None:
        """The cached tensors for `key` (local, then the mirror), or None."""
        path = self._path(key)
        if path.is_file():
            return load_tensors(path.read_bytes())
        if self.mirror is not None:
            try:
                data = self.mirror.get_bytes(self._remote(key))
            except FileNotFoundError:
                return None
            _write_atomic(path, data)
            return load_tensors(data)
        return None

    def put(self, key: str, tensors: Tensors) -> None:
        """Store tensors locally (atomically) and in the mirror."""
        data = save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        _write_atomic(self._path(key), data)
        if self.mirror is not None:
            self.mirror.put_bytes(self._remote(key), data)


def cache_namespace(cfg: Any, kind: str, model_id: str) -> dict[str, Any]:
    """The namespace of a run's cache: kind ("vae" | "text"), model identity, and every
    data-loader setting that changes images or captions."""
    from runner.data.transforms import ImageTransform

    loader = cfg.data_loader
    transform = ImageTransform(loader.center_crop, loader.random_flip).params()
    data = loader.model_dump(mode="json", exclude={"dataloader_num_workers", "max_bad_image_share"})
    return {
        "kind": kind,
        "model": model_id,
        "transform": transform,
        "data_loader": data,
        "format": 1,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(path, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
