"""Training step time: kubetune's step vs a bare diffusers-example-style LoRA loop, in one run.

Default: the tiny SD1.5-shaped model on whatever device is present (framework overhead;
goal ≤ 1.05×). ``--full``: full-size SD1.5 (512², batch 4) and SDXL (1024², batch 1 and 4)
models built from the official configs with random weights (no download), LoRA rank 16,
bf16, with and without gradient checkpointing: images/s, peak memory and MFU (UNet FLOPs
from ``torch.utils.flop_counter`` over one step, against the card's dense bf16 peak) for
both loops. ``--peak-memory-cache``: kubetune's peak GPU memory and images/s with and without
cached VAE / text-encoder outputs (encoders moved off the GPU). Both need CUDA; on a CPU
they print "no CUDA" and exit 0, unless ``--tiny`` runs the same code on the tiny models
(a smoke test of this script, any device).

    python benchmarks/train_step.py [--steps 10] [--rounds 3]
    python benchmarks/train_step.py --full [--peak-memory-cache]
    python benchmarks/train_step.py --full --peak-memory-cache --tiny   # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from train_step_loops import (  # noqa: E402
    Step,
    bare_step,
    full_components,
    kubetune_step,
    make_batch,
    tiny_components,
)

from runner.models.loading import Components  # noqa: E402
from runner.models.tiny import build_tiny_sd, build_tiny_sdxl  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
"""Dense bf16 tensor-core peak, TFLOP/s (no sparsity)."""
CASES = ((False, 512, 4), (True, 1024, 1), (True, 1024, 4))
TINY_CASES = ((False, 64, 4), (True, 64, 1), (True, 64, 4))
Builder = Callable[[bool], Components]


# --- measuring ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter
"""Wall time; ``--cpu-time`` (CPU only) switches to the process's CPU time, which a noisy
neighbour on a shared machine stretches far less."""


def time_steps(step: Step, batch: dict[str, Any], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps (one sync at the end, like training)."""
    sync(device)
    start = CLOCK()
    for _ in range(steps):
        step(batch)
    sync(device)
    return (CLOCK() - start) / steps


def unet_flops(step: Step, batch: dict[str, Any]) -> float:
    """FLOPs the UNet executes in one training step (forward + backward), as counted by
    ``torch.utils.flop_counter``; the whole step's if the module breakdown is missing."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    unet = counter.get_flop_counts().get("UNet2DConditionModel")
    return float(sum(unet.values()) if unet else counter.get_total_flops())


def count_syncs(step: Step, batch: dict[str, Any], device: torch.device) -> int | None:
    """Host-device synchronisations in one step (CUDA's sync debug mode), None off CUDA."""
    if device.type != "cuda":
        return None
    sync(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def measure(
    label: str,
    steps: dict[str, Step],
    batch: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """Interleave rounds of both loops (fair under noisy neighbours); median s/step."""
    for step in steps.values():
        time_steps(step, batch, args.warmup, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, batch, args.steps, device))
    result = {name: statistics.median(t) for name, t in times.items()}
    images = len(batch["caption"])
    ratio = result["kubetune"] / result["bare"]
    print(
        f"{label}: kubetune {result['kubetune'] * 1e3:.1f} ms/step "
        f"({images / result['kubetune']:.2f} img/s), bare {result['bare'] * 1e3:.1f} ms/step "
        f"({images / result['bare']:.2f} img/s), step-time ratio {ratio:.3f}x"
        f"{' (CPU time)' if CLOCK is time.process_time else ''}; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return result


# --- modes -------------------------------------------------------------------------------------


def run_overhead(args: argparse.Namespace) -> None:
    """Tiny SD1.5 on this device: framework overhead per step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd(Path(tmp) / "tiny-sd")
        steps = {
            "kubetune": kubetune_step(tiny_components(model, dtype, device), args, device),
            "bare": bare_step(tiny_components(model, dtype, device), args, device),
        }
    batch = make_batch(args.batch, args.side, device)
    measure(
        f"tiny SD1.5 {args.side}px batch {args.batch} {args.dtype} on {device.type}",
        steps,
        batch,
        args,
        device,
    )


def timed_run(
    step: Step, batch: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> float:
    time_steps(step, batch, args.warmup, device)
    return statistics.median(
        time_steps(step, batch, args.steps, device) for _ in range(args.rounds)
    )


def run_case(
    build: Builder,
    sdxl: bool,
    batch_size: int,
    args: argparse.Namespace,
    device: torch.device,
    flops_cache: dict[tuple[bool, int, int], float],
) -> None:
    """Both loops on one model / size / batch / checkpointing setting, one after the other
    (fresh models each, memory freed in between)."""
    label = (
        f"{'SDXL' if sdxl else 'SD1.5'} {args.side}px batch {batch_size} rank {args.rank} "
        f"{args.dtype}{' +GC' if args.gradient_checkpointing else ''}"
    )
    batch = make_batch(batch_size, args.side, device)
    key = (sdxl, args.side, batch_size)
    seconds, peaks, syncs = {}, {}, {}
    for name, make in (("kubetune", kubetune_step), ("bare", bare_step)):
        reset_memory(device)
        step = make(build(sdxl), args, device)
        if key not in flops_cache and not args.gradient_checkpointing:  # model FLOPs: no
            flops_cache[key] = unet_flops(step, batch)  # recomputation
        seconds[name] = timed_run(step, batch, args, device)
        syncs[name] = count_syncs(step, batch, device)
        peaks[name] = peak_gib(device)
        del step
    flops, peak = flops_cache.get(key), peak_tflops()
    parts = []
    for name in ("kubetune", "bare"):
        mfu = f", MFU {flops / seconds[name] / (peak * 1e12) * 100:.1f}%" if peak and flops else ""
        sync_note = "" if syncs[name] is None else f", {syncs[name]} syncs/step"
        parts.append(
            f"{name} {batch_size / seconds[name]:.2f} img/s, peak "
            f"{peaks[name]:.1f} GiB{mfu}{sync_note}"
        )
    print(
        f"{label}: " + "; ".join(parts) + f"; images/s ratio "
        f"{seconds['bare'] / seconds['kubetune']:.3f}x, memory ratio "
        f"{peaks['kubetune'] / peaks['bare']:.3f}x"
        + (f"; UNet {flops / 1e9:.1f} GFLOP/step" if flops else ""),
        flush=True,
    )


def run_cache_case(
    build: Builder, sdxl: bool, batch_size: int, args: argparse.Namespace, device: torch.device
) -> None:
    """kubetune with and without cached VAE / text-encoder outputs: peak memory, images/s."""
    label = f"{'SDXL' if sdxl else 'SD1.5'} {args.side}px batch {batch_size} {args.dtype}"
    batch = make_batch(batch_size, args.side, device)
    seconds, peaks = {}, {}
    for name, cached in (("uncached", False), ("cached", True)):
        reset_memory(device)
        step = kubetune_step(build(sdxl), args, device, cache_batch=batch if cached else None)
        if device.type == "cuda":  # the steps' peak, not the one-off cache warm-up's
            torch.cuda.reset_peak_memory_stats()
        seconds[name] = timed_run(step, batch, args, device)
        peaks[name] = peak_gib(device)
        del step
    print(
        f"{label} kubetune caches: uncached {batch_size / seconds['uncached']:.2f} img/s, "
        f"peak {peaks['uncached']:.1f} GiB; cached (VAE/TE off GPU) "
        f"{batch_size / seconds['cached']:.2f} img/s, peak {peaks['cached']:.1f} GiB; "
        f"memory ratio {peaks['cached'] / peaks['uncached']:.3f}x",
        flush=True,
    )


def builder(args: argparse.Namespace, device: torch.device, tmp: Path) -> Builder:
    dtype = getattr(torch, args.dtype)
    if not args.tiny:
        return lambda sdxl: full_components(sdxl, dtype, device)
    dirs = {False: build_tiny_sd(tmp / "tiny-sd"), True: build_tiny_sdxl(tmp / "tiny-sdxl")}
    return lambda sdxl: tiny_components(dirs[sdxl], dtype, device)


def run_full(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() and not args.tiny:
        print("no CUDA: --full / --peak-memory-cache need a GPU; nothing measured")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}{' (tiny models)' if args.tiny else ''}")
    args.dtype, args.mixed_precision = "bfloat16", "bf16"
    flops_cache: dict[tuple[bool, int, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        build = builder(args, device, Path(tmp))
        for sdxl, side, batch in TINY_CASES if args.tiny else CASES:
            args.side = side
            if args.full:
                for gc_on in (False, True):
                    args.gradient_checkpointing = gc_on
                    run_case(build, sdxl, batch, args, device, flops_cache)
            if args.peak_memory_cache:
                args.gradient_checkpointing = False
                run_cache_case(build, sdxl, batch, args, device)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size models (CUDA only)")
    parser.add_argument(
        "--peak-memory-cache",
        action="store_true",
        help="peak memory with vs without cached VAE/TE outputs (CUDA only)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="run --full / --peak-memory-cache on the tiny models (any device)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile both UNets")
    parser.add_argument(
        "--cpu-time", action="store_true", help="time by process CPU time (CPU runs under load)"
    )
    parser.add_argument(
        "--no-channels-last",
        dest="channels_last",
        action="store_false",
        help="kubetune: keep the UNet NCHW on CUDA (A/B of channels_last)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.full or args.peak_memory_cache:
        return run_full(args)
    run_overhead(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
