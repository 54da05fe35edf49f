"""Count host-device synchronisations in Python-visible tensor calls (a diagnostic for tests
and ``benchmarks/gpu_bench.py``; never active in a run).

A sync is a call that makes the host wait for the device: reading a device tensor on the host
(``item``, ``tolist``, ``__bool__`` / ``__int__`` / ``__float__`` / ``__index__``, ``cpu``,
``numpy``) and a blocking ``.to()`` / ``copy_`` across devices (host→device from pageable
memory, device→host). ``non_blocking=True`` copies are not counted.

On a CUDA machine "device tensor" means a tensor not on the CPU. On a CPU-only machine every
tensor is on the CPU, so the counter emulates a GPU: every tensor counts as a device tensor
except the ones marked as host memory (``mark_host``: the loader's batches, which a GPU run
receives in host memory), and a blocking ``.to(device)`` of a host tensor counts as the
host→device copy it would be. Syncs inside C++ kernels (e.g. a data-dependent output size)
are invisible to it.
"""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


class SyncCounter:
    """``with SyncCounter() as c: ...``; ``c.phase("step")`` labels what follows;
    ``c.counts[label]`` and ``c.where[label]`` (``file:line kind`` → count) after."""

    def __init__(self, *, emulate_gpu: bool | None = None) -> None:
        self.emulate = (not torch.cuda.is_available()) if emulate_gpu is None else emulate_gpu
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.label: str | None = None
        self._host: dict[int, Any] = {}
        self._saved: dict[str, Any] = {}
        self._busy = False

    # --- what the caller sees -----------------------------------------------------------
    @contextmanager
    def phase(self, label: str | None) -> Iterator[None]:
        """Count what the block does under ``label`` (None: not counted)."""
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def mark_host(self, tensors: Iterable[Any]) -> None:
        """Treat these tensors as host memory (emulation only; nested dicts/lists walked)."""
        for tensor in _tensors(tensors):
            self._host[id(tensor)] = tensor

    def total(self, label: str) -> int:
        return self.counts[label]

    # --- patching -----------------------------------------------------------------------
    def __enter__(self) -> SyncCounter:
        for name in READS:
            self._patch(name, self._read_wrapper(name))
        self._patch("to", self._to_wrapper())
        self._patch("copy_", self._copy_wrapper())
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        self._host.clear()

    def _patch(self, name: str, make: Any) -> None:
        original = getattr(torch.Tensor, name)
        self._saved[name] = original
        setattr(torch.Tensor, name, make(original))

    def _on_device(self, tensor: torch.Tensor) -> bool:
        if self.emulate:
            return self._host.get(id(tensor)) is not tensor
        return tensor.device.type != "cpu"

    def _count(self, kind: str) -> None:
        if self.label is None or self._busy:
            return
        self._busy = True
        try:
            self.counts[self.label] += 1
            self.where[self.label][f"{_caller()} {kind}"] += 1
        finally:
            self._busy = False

    def _read_wrapper(self, name: str) -> Any:
        def make(original: Any) -> Any:
            def read(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if self.label is not None and self._on_device(tensor):
                    self._count(name)
                return original(tensor, *args, **kwargs)

            return read

        return make

    def _to_wrapper(self) -> Any:
        def make(original: Any) -> Any:
            def to(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if self.label is not None and self._blocking_move(tensor, args, kwargs):
                    self._count("blocking .to()")
                return original(tensor, *args, **kwargs)

            return to

        return make

    def _copy_wrapper(self) -> Any:
        def make(original: Any) -> Any:
            def copy_(tensor: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> Any:
                if self.label is not None and not non_blocking and self._crosses(src, tensor):
                    self._count("blocking copy_")
                return original(tensor, src, non_blocking)

            return copy_

        return make

    def _crosses(self, src: torch.Tensor, dst: torch.Tensor) -> bool:
        if self.emulate:
            return self._on_device(src) != self._on_device(dst)
        return src.device != dst.device

    def _blocking_move(
        self, tensor: torch.Tensor, args: tuple[Any, ...], kw: dict[str, Any]
    ) -> bool:
        if kw.get("non_blocking") or (len(args) > 2 and args[2] is True):
            return False
        target = _target_device(args, kw)
        if target is None:
            return False
        if self.emulate:  # a host tensor copied to "the device" (the only cross visible here)
            return self._host.get(id(tensor)) is tensor
        return target != tensor.device and "cpu" in (target.type, tensor.device.type)


def _target_device(args: tuple[Any, ...], kw: dict[str, Any]) -> torch.device | None:
    candidate = kw.get("device")
    if candidate is None and args:
        first = args[0]
        if isinstance(first, torch.Tensor):
            return first.device
        if isinstance(first, (str, torch.device, int)) and not isinstance(first, bool):
            candidate = first
    if candidate is None:
        return None
    try:
        return torch.device(candidate)
    except (RuntimeError, TypeError):
        return None


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def _caller() -> str:
    """The innermost frame outside this module and torch (where the sync was asked for)."""
    for frame in reversed(traceback.extract_stack(limit=12)[:-3]):
        name = frame.filename
        if "/torch/" not in name and not name.endswith("syncs.py"):
            parts = name.split("/")
            return f"{'/'.join(parts[-2:])}:{frame.lineno}"
    return "?"
