"""What a run has before its first write: the accelerator, the base model on its device and
the checked data. Loading overlaps the data preflight; nothing here writes to the run."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
from accelerate import Accelerator

from kubetune.dataset.preflight import PreflightReport
from kubetune.errors import UserError
from kubetune.humanize import count
from runner.data.size_relay import follow_sizes, publish_sizes
from runner.models.loading import Components, ModelSettings, load_model, to_dtype
from runner.training.distributed import Ranks
from runner.training.speed import enable_tf32

log = logging.getLogger(__name__)
SIZES_PREFIX = "kubetune/sizes/"
"""Where global rank 0 publishes a streaming order's image sizes in the run's store."""


@dataclass(frozen=True)
class Loaded:
    """The accelerator, the base model on its device and the preflight's report."""

    accelerator: Accelerator
    comps: Components
    data: PreflightReport


def make_accelerator(mixed_precision: str) -> Accelerator:
    """The run's accelerator (in the process group ``runner.training.distributed`` joined;
    without CUDA, ``cpu=True``, or accelerate would not use the group's gloo backend)."""
    try:
        cpu = not torch.cuda.is_available()
        accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError as err:
        raise UserError(
            f"mixed_precision {mixed_precision}: {err}",
            hint="use mixed_precision: no on this machine",
        ) from err
    enable_tf32(accelerator.device)
    return accelerator


def place_models(comps: Components, weight_dtype: str, device: torch.device) -> None:
    """Frozen weights in ``weight_dtype`` on the device (SDXL's VAE stays float32 with
    float16 weights: it overflows in half precision)."""
    dtype = to_dtype(weight_dtype)
    for module in (comps.unet, *comps.text_encoders):
        module.to(device=device, dtype=dtype)
    vae_dtype = torch.float32 if (comps.is_sdxl and dtype == torch.float16) else dtype
    comps.vae.to(device=device, dtype=vae_dtype)


def load_base(settings: ModelSettings, device: torch.device) -> Components:
    """The base model (UNet, VAE, tokenizers, text encoders, base embeddings) loaded and placed
    on ``device``. Writes nothing to the run, so a run does it while its preflight runs."""
    comps = load_model(settings)
    place_models(comps, settings.weight_dtype, device)
    return comps


def load_then_join(
    mixed_precision: str,
    model: ModelSettings,
    pending: Future[PreflightReport] | None,
    ranks: Ranks | None = None,
) -> Loaded:
    """The accelerator and the base model, loaded while the preflight (listing, header reads
    or the stored index) runs; then the preflight's report: a bad dataset fails here, before
    the lease or any other write. If loading fails, a failed preflight is still reported
    first, as when it ran first. Several processes (``ranks``): each rank loads its own copy,
    and a rank that fails to (its node's download or cache) ends every rank with its error
    (``Ranks.each``); the preflight is global rank 0's (``pending`` None elsewhere) and its
    report or error reaches every rank (``shared_report``)."""

    def load() -> tuple[Accelerator, Components]:
        return _load(mixed_precision, model, pending)

    accelerator, comps = ranks.each(load) if ranks is not None else load()
    return Loaded(accelerator, comps, shared_report(pending, ranks))


def _load(
    mixed_precision: str, model: ModelSettings, pending: Future[PreflightReport] | None
) -> tuple[Accelerator, Components]:
    try:
        accelerator = make_accelerator(mixed_precision)
        started = time.perf_counter()
        log.info("loading the base model %s (%s weights) on %s", model.model,
                 model.weight_dtype, describe_device(accelerator))  # fmt: skip
        comps = load_base(model, accelerator.device)
        log.info("base model loaded in %.1f s", time.perf_counter() - started)
    except Exception:
        if pending is not None:
            pending.result()  # a bad dataset's error, else the loading error below
        raise
    return accelerator, comps


def shared_report(pending: Future[PreflightReport] | None, ranks: Ranks | None) -> PreflightReport:
    """The preflight's report on every rank: global rank 0 waits for its own and sends it
    (with checks beside training: the listed report; its DataError, if any, is raised on every
    rank). The other ranks' reports then hold a `pending` that never ends: the checks'
    verdict comes from rank 0 at a step every rank settles together
    (``ResumableLoader.settle``). Checks that stream sizes (``aspect_ratio_buckets.order:
    streaming``) stay rank 0's alone too: their sizes reach every rank's sampler, rank 0's
    included, through the run's store (``runner.data.size_relay``)."""
    if ranks is None or not ranks.several:
        assert pending is not None
        return pending.result()
    ours: list[PreflightReport] = []

    def rank_0() -> tuple[PreflightReport, bool]:
        assert pending is not None, "global rank 0 runs the preflight"
        ours.append(pending.result())  # a bad dataset's DataError: raised on every rank
        return replace(ours[0], pending=None, feed=None), ours[0].pending is not None

    report, deferred = ranks.from_rank_0(rank_0)
    if ours:
        mine = ours[0]
        if mine.feed is None:
            return mine
        return replace(mine, feed=publish_sizes(mine.feed, ranks.store(SIZES_PREFIX)))
    feed = follow_sizes(report.num_examples, ranks.store(SIZES_PREFIX)) if report.streamed else None
    return replace(report, pending=Future() if deferred else None, feed=feed)


def describe_device(accelerator: Accelerator) -> str:
    """``cpu`` / ``cuda:0 (NVIDIA H100 80GB HBM3)``, with the process count and precision."""
    device = accelerator.device
    name = (
        f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    )
    processes = accelerator.num_processes
    where = f"{name}, {count(processes, 'process')}" if processes > 1 else name
    return f"{where}, mixed precision {accelerator.mixed_precision}"
