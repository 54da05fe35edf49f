"""``compile_unet``: torch.compile for the training steps only, with bounded recompiles.

Inductor's Triton kernels are built with the system C compiler against the Python headers at
the first compiled step; the kubetune image has both (``build-essential``, ``python3-dev``),
and a run whose image lacks them fails before training with the reason instead of inside
Triton. Each distinct input shape (aspect bucket × full / short batch) compiles once
(``dynamic=False``): dynamo's cache is sized for them so no shape falls back to eager.
Validation calls the plain UNet (eval mode, CFG batch 2): it never compiles.
"""

from __future__ import annotations

import logging
import os
import shutil
import sysconfig
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from kubetune.errors import UserError

COMPILE_BACKEND = "inductor"
MANY_SHAPES = 16
"""More shapes than this: the run says compiling them all takes a while."""
log = logging.getLogger(__name__)
"""torch.compile's backend (tests use a counting backend)."""


def compiler_problem() -> str | None:
    """Why compiled kernels cannot be built on this machine, or None."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        return "no C compiler (cc / gcc) on PATH: Triton builds its kernels with one"
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        return f"no Python headers ({headers}): Triton builds its launcher against them"
    return None


def training_shapes(target_hw: Iterable[tuple[int, int]]) -> int:
    """Input shapes a run's steps can see: each bucket with a full and a short last batch."""
    return 2 * len(set(map(tuple, target_hw)))


def compile_for_training(unet: nn.Module, shapes: int) -> nn.Module:
    """The UNet compiled for the training steps (the module itself stays eager)."""
    problem = compiler_problem()
    if problem is not None:
        raise UserError(
            f"compile_unet: {problem}",
            hint="use the kubetune image (it has build-essential and python3-dev) or set "
            "compile_unet: false",
        )
    if shapes > MANY_SHAPES:
        log.warning(
            "compile_unet: %d input shapes (aspect buckets x full / short batch) each compile "
            "once, about a minute apiece on a GPU; fewer buckets compile faster",
            shapes,
        )
    config = torch._dynamo.config  # recompile_limit: cache_size_limit before torch 2.6
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    total = f"accumulated_{limit}"
    setattr(config, limit, max(getattr(config, limit), shapes + 1))
    setattr(config, total, max(getattr(config, total), getattr(config, limit)))
    return torch.compile(unet, backend=COMPILE_BACKEND, dynamic=False)
