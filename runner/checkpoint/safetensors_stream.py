"""Write and read ``.safetensors`` files one tensor at a time.

``safetensors.torch.save_file`` needs every tensor on the host, contiguous and in its final
dtype before it writes: for a model on the GPU, or saved in another dtype, that is a second
copy of the whole model in host memory (~5 GB for an fp16 SDXL UNet, 10 GB in float32).
``write_safetensors`` computes the header from shapes alone, then converts and writes each
tensor in turn, so the extra memory is one tensor. ``copy_into`` reads a file
back into existing tensors the same way. The files are ordinary safetensors files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _header(
    tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None, metadata: dict[str, str]
) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        kind = _target(tensor, dtype)
        size = tensor.numel() * kind.itemsize
        entries[name] = {
            "dtype": DTYPES[kind],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the header is padded to 8 bytes, as safetensors does


def _target(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype`` for floating-point tensors (cast on the way out), the tensor's own else."""
    return dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype


def write_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (on any device) to ``path``, floating-point ones cast to ``dtype``
    if given, holding at most one converted tensor in host memory at a time."""
    path = Path(path)
    header = _header(tensors, dtype, metadata or {})
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for tensor in tensors.values():
            _write_tensor(f, tensor.detach(), _target(tensor, dtype))
        f.flush()
        os.fsync(f.fileno())
    return path


def _write_tensor(f: object, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    host = tensor.to(device="cpu", dtype=dtype).contiguous().reshape(-1)
    if host.numel():
        f.write(host.view(torch.uint8).numpy().data)  # type: ignore[attr-defined]


def copy_into(path: str | Path, targets: Mapping[str, torch.Tensor]) -> None:
    """Copy each tensor of the file into the same-named tensor of ``targets`` (cast to its
    dtype and device), reading one tensor at a time. Raises ``KeyError`` naming missing keys."""
    with safe_open(str(path), framework="pt", device="cpu") as f:
        missing = sorted(set(targets) - set(f.keys()))
        if missing:
            raise KeyError(f"{Path(path).name} lacks {missing[:3]}")
        with torch.no_grad():
            for name, target in targets.items():
                target.copy_(f.get_tensor(name))
