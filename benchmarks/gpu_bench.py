"""One GPU benchmark: kubetune's LoRA training step against a bare diffusers-example-style loop
on models of the real SD1.5 / SDXL sizes (random weights built from the official configs, no
download), plus the A/Bs that decide kubetune's defaults.

    python benchmarks/gpu_bench.py                  # one H100/H200: about 6-7 min, no network
    python benchmarks/gpu_bench.py --tiny           # tiny models, any device (CI runs it on CPU)
    python benchmarks/gpu_bench.py --json out.jsonl # also one JSON object per figure

Cases: SD1.5 512² and SDXL 1024², batch 1 and 4, gradient checkpointing off and on, bf16
weights + bf16 autocast, LoRA rank 16 on to_q/k/v/out.0 in both loops. Per loop: images/s
(median of interleaved rounds), peak GPU memory, UNet MFU (FLOPs of one step counted by
``torch.utils.flop_counter`` on the non-checkpointed step / step time / the card's dense bf16
peak) and host syncs per step (CUDA's sync debug mode; and the Python-visible ones counted by
``runner.training.syncs.SyncCounter``). A/Bs on kubetune alone (SD1.5 512² batch 4):
channels_last on/off, mixed_precision bf16/no with bf16 weights, LoRA targets attention-only
vs the default list. ``--budget-s`` stops starting new measurements when the time is spent
(and says which were skipped), so the command stays within its time on a slower card.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

import torch  # noqa: E402
from train_step import (  # noqa: E402
    builder,
    count_syncs,
    peak_gib,
    peak_tflops,
    reset_memory,
    time_steps,
    unet_flops,
)
from train_step_loops import Step, bare_step, kubetune_step, make_batch  # noqa: E402

from kubetune.config.pipelines import DEFAULT_UNET_LORA_TARGETS  # noqa: E402
from runner.training.syncs import SyncCounter  # noqa: E402

CASES = (("SD1.5", False, 512, 1), ("SD1.5", False, 512, 4), ("SDXL", True, 1024, 1),
         ("SDXL", True, 1024, 4))  # fmt: skip
TINY_SIDE = 64
AB_CASE = ("SD1.5", False, 512, 4)


@dataclass
class Figures:
    """One loop on one case."""

    loop: str
    images_per_s: float
    peak_gib: float
    mfu: float | None
    cuda_syncs: int | None
    python_syncs: int


@dataclass
class Result:
    label: str
    figures: list[Figures] = field(default_factory=list)

    def line(self) -> str:
        parts = []
        for f in self.figures:
            mfu = "" if f.mfu is None else f", MFU {f.mfu * 100:.1f}%"
            cuda = "" if f.cuda_syncs is None else f", {f.cuda_syncs} CUDA syncs/step"
            parts.append(
                f"{f.loop} {f.images_per_s:.2f} img/s, peak {f.peak_gib:.1f} GiB{mfu}{cuda}, "
                f"{f.python_syncs} Python syncs/step"
            )
        first, *rest = self.figures
        ratio = "".join(f"; {first.loop}/{r.loop} img/s {first.images_per_s / r.images_per_s:.3f}x"
                        for r in rest)  # fmt: skip
        return f"{self.label}: " + "; ".join(parts) + ratio


# --- measuring -----------------------------------------------------------------------------


def reset_accelerate() -> None:
    """A fresh accelerate state: each kubetune loop builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def python_syncs(step: Step, batch: dict[str, Any], device: torch.device) -> int:
    """Python-visible syncs of one step. On CPU the counter emulates a GPU (see its doc):
    the batch and the optimizers' step counters (host tensors on CUDA too, unless fused)
    are marked as host memory."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    emulate = device.type == "cpu"
    with SyncCounter(emulate_gpu=emulate) as counter:
        counter.mark_host([batch])

        def host_counters(optimizer: Any, *_: Any) -> None:
            counter.mark_host([s.get("step") for s in optimizer.state.values()])

        hook = register_optimizer_step_pre_hook(host_counters) if emulate else None
        try:
            with counter.phase("step"):
                step(batch)
        finally:
            if hook is not None:
                hook.remove()
    return counter.total("step")


def measure(
    loop: str, step: Step, batch: dict[str, Any], args: argparse.Namespace, flops: float | None
) -> Figures:
    device = args.device
    time_steps(step, batch, args.warmup, device)
    seconds = sorted(time_steps(step, batch, args.steps, device) for _ in range(args.rounds))
    median = seconds[len(seconds) // 2]
    peak = peak_tflops()
    mfu = flops / median / (peak * 1e12) if flops and peak else None
    cuda = count_syncs(step, batch, device)
    return Figures(loop, len(batch["caption"]) / median, peak_gib(device), mfu, cuda,
                   python_syncs(step, batch, device))  # fmt: skip


def build_step(loop: str, build: Any, sdxl: bool, args: argparse.Namespace) -> Step:
    reset_memory(args.device)
    if loop == "bare":
        return bare_step(build(sdxl), args, args.device)
    reset_accelerate()
    return kubetune_step(build(sdxl), args, args.device)


# --- the runs ------------------------------------------------------------------------------


class Clock:
    """The run's time budget: measurements start only while it lasts."""

    def __init__(self, budget_s: float) -> None:
        self.deadline = time.monotonic() + budget_s
        self.skipped: list[str] = []

    def allows(self, label: str) -> bool:
        if time.monotonic() < self.deadline:
            return True
        self.skipped.append(label)
        return False


@contextmanager
def options(args: argparse.Namespace, **values: Any) -> Iterator[None]:
    """``args`` with ``values`` set for the block."""
    saved = {k: getattr(args, k) for k in values}
    for key, value in values.items():
        setattr(args, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(args, key, value)


def compare(build: Any, case: tuple[str, bool, int, int], args: argparse.Namespace) -> Result:
    """kubetune and the bare loop on one case, one after the other (fresh models each)."""
    name, sdxl, side, batch_size = case
    gc = " +GC" if args.gradient_checkpointing else ""
    result = Result(f"{name} {side}px batch {batch_size}{gc}")
    batch = make_batch(batch_size, side, args.device)
    for loop in ("kubetune", "bare"):
        step = build_step(loop, build, sdxl, args)
        flops = None if args.gradient_checkpointing else unet_flops(step, batch)
        result.figures.append(measure(loop, step, batch, args, flops))
        del step
    return result


def ab(
    build: Any, case: tuple[str, bool, int, int], args: argparse.Namespace, what: str,
    variants: dict[str, dict[str, Any]],
) -> Result:  # fmt: skip
    """kubetune alone under each variant of one setting."""
    name, sdxl, side, batch_size = case
    result = Result(f"A/B {what}: {name} {side}px batch {batch_size}")
    batch = make_batch(batch_size, side, args.device)
    for label, values in variants.items():
        with options(args, **values):
            step = build_step("kubetune", build, sdxl, args)
            result.figures.append(measure(label, step, batch, args, None))
            del step
    return result


def ab_variants(device: torch.device) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {
        "mixed precision (bf16 weights)": {
            "mixed_precision=bf16": {"mixed_precision": "bf16"},
            "mixed_precision=no": {"mixed_precision": "no"},
        },
        "LoRA targets": {
            "attention": {"targets": None},
            "default": {"targets": list(DEFAULT_UNET_LORA_TARGETS)},
        },
    }
    if device.type == "cuda":  # channels_last is a no-op off CUDA
        out["channels_last"] = {"on": {"channels_last": True}, "off": {"channels_last": False}}
    return out


def run(args: argparse.Namespace) -> list[Result]:
    clock, results = Clock(args.budget_s), []
    cases = [(n, x, TINY_SIDE if args.tiny else s, b) for n, x, s, b in CASES]
    ab_case = next(c for c in cases if c[0] == AB_CASE[0] and c[3] == AB_CASE[3])
    with tempfile.TemporaryDirectory() as tmp:
        build = builder(args, args.device, Path(tmp))
        for case in cases:
            for gc in (False, True):
                label = f"{case[0]} batch {case[3]}{' +GC' if gc else ''}"
                if clock.allows(label):
                    with options(args, gradient_checkpointing=gc, side=case[2]):
                        results.append(report(compare(build, case, args), args))
        for what, variants in ab_variants(args.device).items():
            if clock.allows(f"A/B {what}"):
                with options(args, gradient_checkpointing=False, side=ab_case[2]):
                    results.append(report(ab(build, ab_case, args, what, variants), args))
    if clock.skipped:
        print(f"time budget ({args.budget_s:.0f} s) spent; not measured: "
              + ", ".join(clock.skipped), flush=True)  # fmt: skip
    return results


def report(result: Result, args: argparse.Namespace) -> Result:
    print(result.line(), flush=True)
    if args.json:
        row = {"label": result.label, "figures": [asdict(f) for f in result.figures]}
        with open(args.json, "a") as out:
            out.write(json.dumps(row) + "\n")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models, any device (CI)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no measurement after this many seconds")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.steps = args.steps or (2 if args.tiny else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 2)
    # what train_step_loops reads
    args.dtype, args.mixed_precision, args.gradient_checkpointing = "bfloat16", "bf16", False
    args.compile, args.channels_last, args.side, args.targets = False, True, TINY_SIDE, None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.type != "cuda" and not args.tiny:
        print("no CUDA: the full-size benchmark needs a GPU; `--tiny` runs it on tiny models")
        return 0
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}{' (tiny models)' if args.tiny else ''}",
          flush=True)  # fmt: skip
    started = time.monotonic()
    run(args)
    print(f"total {time.monotonic() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
