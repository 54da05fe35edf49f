"""Data-parallel step time: 1 vs 2 processes (torchrun, gloo on CPU; NCCL on GPUs), gradients
averaged by DDP's bucketed all-reduce (``runner.training.distributed.data_parallel``: starts
during backward, no sync on accumulation micro-batches) vs the hand-written flat all-reduce
after backward (``StepRunner._all_reduce_grads``). Same model, batch and step code otherwise.

Each world size runs in its own torchrun; inside it the two syncs alternate round by round
(interleaved, so drifting machine load hits both alike). Per process batch ``--batch``, global
batch ``--batch`` × processes; ``--accumulation`` micro-batches per step.

    python benchmarks/dp_step_time.py [--steps 8] [--rounds 5] [--batch 2] [--accumulation 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per round and sync")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--batch", type=int, default=2, help="examples per process per micro-batch")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # the result file, inside torchrun
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One process of the torchrun: build the tiny LoRA step, time both syncs in turns."""
    import torch
    from train_step_loops import bench_config, make_batch, tiny_components

    from runner.models.tiny import build_tiny_sd
    from runner.session.build import build_training
    from runner.session.load import make_accelerator, place_models
    from runner.session.settings import process_group_timeout
    from runner.training.distributed import data_parallel, start_processes
    from runner.training.loop import StepRunner

    settings = argparse.Namespace(
        rank=args.rank,
        mixed_precision="no",
        dtype="float32",
        gradient_checkpointing=False,
        compile=False,
        side=args.side,
    )
    cfg = bench_config(settings, False)
    state = start_processes(process_group_timeout(cfg))
    device = state.device
    model = Path(tempfile.gettempdir()) / f"kubetune-dp-bench-{os.getuid()}" / "tiny-sd"
    if state.is_main_process and not model.exists():
        build_tiny_sd(model, seed=0)
    state.wait_for_everyone()
    comps = tiny_components(model, torch.float32, device)
    accelerator = make_accelerator(cfg.mixed_precision)
    place_models(comps, cfg.weight_dtype, device)
    torch.manual_seed(0)
    pipeline, optimizer, scheduler = build_training(cfg, comps, accelerator, 10**6)
    runner = StepRunner(accelerator, pipeline, optimizer, scheduler,
                        torch.Generator(device).manual_seed(0), cfg.max_grad_norm)  # fmt: skip
    engine = data_parallel(pipeline, device)
    group = [make_batch(args.batch, args.side, device) for _ in range(args.accumulation)]
    times: dict[str, list[float]] = {"engine": [], "flat": []}
    for round_ in range(args.rounds + 1):  # round 0 warms up both
        for sync, replica in (("engine", engine), ("flat", None)):
            runner.replica = replica
            state.wait_for_everyone()
            start = time.perf_counter()
            for _ in range(args.steps):
                runner.run(group, 0)
            state.wait_for_everyone()
            if round_:
                times[sync].append((time.perf_counter() - start) / args.steps)
    if state.is_main_process:
        Path(args.worker).write_text(json.dumps(times))


def launch(args: argparse.Namespace, nproc: int) -> dict[str, list[float]]:
    out = Path(tempfile.mkdtemp(prefix="kubetune-dp-bench-")) / "times.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", __file__, "--worker", str(out),
           "--steps", str(args.steps), "--rounds", str(args.rounds), "--batch", str(args.batch),
           "--accumulation", str(args.accumulation), "--side", str(args.side),
           "--rank", str(args.rank)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def main() -> None:
    args = parse()
    if args.worker:
        worker(args)
        return
    load = os.getloadavg()
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"{os.cpu_count()} CPUs; OMP_NUM_THREADS={threads}")  # fmt: skip
    results = {n: launch(args, n) for n in (1, 2)}
    print(f"per process batch {args.batch} x {args.accumulation} micro-batches, "
          f"{args.steps} steps x {args.rounds} rounds (median of rounds, s/step):")  # fmt: skip
    for n, times in results.items():
        engine, flat = statistics.median(times["engine"]), statistics.median(times["flat"])
        images = args.batch * args.accumulation * n
        rates = f"{images / engine:.1f} vs {images / flat:.1f} img/s"
        print(f"  {n} process(es): engine {engine:.4f} s, flat {flat:.4f} s ({rates}), "
              f"engine/flat {engine / flat:.3f}")  # fmt: skip
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
