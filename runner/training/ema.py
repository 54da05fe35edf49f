"""Exponential moving average of the trained weights (``ema_decay``), optionally held in CPU
memory. A checkpoint holds its exact float32 state (``state_dict``); ``applied()`` swaps the
averaged weights into the model for validation and export and restores the raw ones after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class EmaWeights:
    """``shadow ← decay · shadow + (1 − decay) · param`` after every optimizer step."""

    def __init__(
        self,
        params: dict[str, nn.Parameter],
        decay: float,
        device: torch.device | None = None,
    ) -> None:
        self.params, self.decay = params, decay
        self.shadow = {
            name: p.detach().to(device or p.device, torch.float32, copy=True)
            for name, p in params.items()
        }

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            shadow = self.shadow[name]
            shadow.lerp_(param.detach().to(shadow.device, torch.float32), 1.0 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {n: s.cpu() for n, s in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["shadow"]
        missing = set(self.shadow) - set(saved)
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:3]}")
        for name, shadow in self.shadow.items():
            shadow.copy_(saved[name])

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration of the block."""
        raw = {name: p.detach().clone() for name, p in self.params.items()}
        try:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(self.shadow[name].to(param.device, param.dtype))
            yield
        finally:
            with torch.no_grad():
                for name, param in self.params.items():
                    param.copy_(raw[name])
