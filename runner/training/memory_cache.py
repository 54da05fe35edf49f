"""In-memory encoder-output caches (VAE latent moments, text embeddings) bounded on the device.

Entries stay on the training device while the shared ``DeviceBudget`` allows; the rest wait
in host memory (pinned when CUDA is available, so the per-batch copy is non-blocking) and are
copied in when read. 10k images at 1024² take 5–8 GB as latents plus SDXL embeddings: without
a bound they crowd the UNet's activations out of GPU memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from runner.training.speed import to_device

K = TypeVar("K")
Entry = tuple[torch.Tensor | None, ...]


@dataclass
class DeviceBudget:
    """Bytes of device memory the caches sharing it may hold (None: unbounded)."""

    limit: int | None
    used: int = 0

    def take(self, size: int) -> bool:
        """Reserve ``size`` bytes if they fit."""
        if self.limit is not None and self.used + size > self.limit:
            return False
        self.used += size
        return True


def _bytes(entry: Entry) -> int:
    return sum(t.numel() * t.element_size() for t in entry if t is not None)


class BoundedCache(Generic[K]):
    """A mapping key → tuple of tensors (None allowed) that reads back on ``device``."""

    def __init__(self, device: torch.device, budget: DeviceBudget) -> None:
        self.device, self.budget = device, budget
        self._entries: dict[K, Entry] = {}
        self.spilled: set[K] = set()
        """Keys whose tensors wait in host memory."""

    def __setitem__(self, key: K, entry: Entry) -> None:
        if key in self._entries:
            return  # first write wins: entries never change
        if self.budget.take(_bytes(entry)):
            self._entries[key] = tuple(_own(t, self.device) for t in entry)
            return
        self._entries[key] = tuple(_host(t) for t in entry)
        self.spilled.add(key)

    def __getitem__(self, key: K) -> Entry:
        """The entry on the device (a spilled one copied in, non-blocking from pinned memory)."""
        entry = self._entries[key]
        if key not in self.spilled:
            return entry
        return tuple(None if t is None else to_device(t, self.device) for t in entry)

    def get(self, key: K, default: Entry | None = None) -> Entry | None:
        return self[key] if key in self._entries else default

    def stored(self, key: K) -> Entry:
        """The entry where it is kept (for persisting it: no copy to the device)."""
        return self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[K]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[K, Entry]]:
        """(key, entry where it is kept)."""
        return iter(self._entries.items())


def _own(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A compact copy on the device (a row of a batch would keep the whole batch alive)."""
    if tensor is None:
        return None
    return to_device(tensor.detach(), device).clone()


def _host(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None:
        return None
    host = tensor.detach().to("cpu", copy=True)
    return host.pin_memory() if torch.cuda.is_available() else host
