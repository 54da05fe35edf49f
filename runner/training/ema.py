"""Exponential moving average of the trained weights (``ema_decay``), optionally held in CPU
memory. A checkpoint holds its exact float32 state (``state_dict``); ``applied()`` swaps the
averaged weights into the model for validation and export and restores the raw ones after.

On the device the update is one fused ``lerp`` over all tensors. In CPU memory
(``ema_on_cpu``) each update is one non-blocking copy of all trained weights, flattened, into
a pinned host buffer; the host averages it in at the next update (or read), when that copy has
long finished, instead of one blocking device→host copy per tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

BUCKET_ELEMENTS = 64 * 2**20
"""Parameters averaged (or staged) per fused call: bounds the float32 temporaries to 256 MiB
(a whole bf16 SDXL UNet widened at once would be 10 GB more on the GPU)."""


def _buckets(params: dict[str, nn.Parameter], limit: int) -> list[list[str]]:
    """Parameter names in order, grouped so each group holds at most ``limit`` elements
    (a larger parameter is a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, param in params.items():
        if groups[-1] and size + param.numel() > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += param.numel()
    return [g for g in groups if g]


class EmaWeights:
    """``shadow ← decay · shadow + (1 − decay) · param`` after every optimizer step."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        decay: float,
        device: torch.device | None = None,
    ) -> None:
        self.params, self.decay = params, decay
        self._shadow = {
            name: p.detach().to(device or p.device, torch.float32, copy=True)
            for name, p in params.items()
        }
        self.on_host = device is not None and device.type == "cpu"
        total = sum(p.numel() for p in params.values())
        pin = self.on_host and torch.cuda.is_available()
        # only an EMA in host memory stages (a full UNet's would be 10 GB for nothing)
        self._staging = torch.empty(
            total if self.on_host else 0, dtype=torch.float32, pin_memory=pin
        )
        self._buckets = _buckets(params, BUCKET_ELEMENTS)
        self._pending: torch.cuda.Event | bool | None = None
        """A copy into ``_staging`` not yet averaged in (its CUDA event, or True off CUDA)."""

    @property
    def shadow(self) -> dict[str, torch.Tensor]:
        """The float32 averages by parameter name (up to date with every update)."""
        self._average_pending()
        return self._shadow

    @torch.no_grad()
    def update(self) -> None:
        weight = 1.0 - self.decay
        if not self.on_host:
            for names in self._buckets:
                params = [self.params[n].detach().float() for n in names]
                torch._foreach_lerp_([self._shadow[n] for n in names], params, weight)
            return
        self._average_pending()
        offset, cuda = 0, False
        for names in self._buckets:
            flat = torch.cat([self.params[n].detach().reshape(-1).float() for n in names])
            self._staging[offset : offset + flat.numel()].copy_(flat, non_blocking=flat.is_cuda)
            offset, cuda = offset + flat.numel(), flat.is_cuda
        self._pending = True
        if cuda:
            self._pending = torch.cuda.Event()
            self._pending.record()

    def _average_pending(self) -> None:
        """Average the last staged copy into the shadow (waits for that copy if needed)."""
        if self._pending is None:
            return
        if isinstance(self._pending, torch.cuda.Event):
            self._pending.synchronize()
        self._pending = None
        offset = 0
        for shadow in self._shadow.values():
            n = shadow.numel()
            shadow.lerp_(self._staging[offset : offset + n].view_as(shadow), 1.0 - self.decay)
            offset += n

    def state_dict(self) -> dict[str, Any]:
        self._average_pending()
        # the live tensors: torch.save copies one at a time to the host (a full fine-tune's
        # EMA is a whole UNet; copying it all first would hold a second one in memory)
        return {"decay": self.decay, "shadow": dict(self._shadow)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = None
        saved = state["shadow"]
        missing = set(self._shadow) - set(saved)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name, shadow in self._shadow.items():
            shadow.copy_(saved[name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block. The raw weights
        wait in host memory: on the GPU they would be a second copy of the trained model
        (a whole UNet for SDXL_FINETUNE) at every validation and checkpoint."""
        self._average_pending()
        raw = {name: p.detach().to("cpu", copy=True) for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.shadow[name].to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(raw[name])
