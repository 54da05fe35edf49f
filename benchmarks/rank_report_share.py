"""What sharing global rank 0's listed preflight report costs the other ranks of a run
(`runner.session.load.shared_report` over `Ranks.from_rank_0`): the pickled size of a listed
report of N examples (JSONL-on-S3-shaped records: key, caption, size, ETag, origin) and the
wall time of the broadcast between 2 gloo processes on this machine (127.0.0.1), each of
`--rounds` measured after one warm-up.

    .venv/bin/python benchmarks/rank_report_share.py --examples 100000
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]


def listed(n: int) -> object:
    """A listed report (no sizes, no index) of ``n`` JSONL-on-S3-shaped records."""
    from kubetune.dataset.preflight import PreflightReport
    from kubetune.dataset.records import Record
    from kubetune.dataset.source import Source

    records = [
        Record(
            f"img-{i:06d}.jpg",
            f"photos/img-{i:06d}.jpg",
            caption=f"a photo number {i}",
            size=180_000 + i,
            etag=f'"{i:032x}"',
            origin=f"data.jsonl:{i + 1}",
        )  # fmt: skip
        for i in range(n)
    ]
    return PreflightReport(n, [], Source("s3://bucket/photos/data.jsonl", records, []))


def worker(rank: int, port: int, n: int, rounds: int) -> None:
    import torch.distributed as dist

    from runner.training.distributed import Ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    state = type("State", (), {"process_index": rank, "num_processes": 2,
                               "is_main_process": rank == 0, "device": "cpu"})  # fmt: skip
    ranks = Ranks(state)  # type: ignore[arg-type]
    report = listed(n) if rank == 0 else None
    times = []
    for _ in range(rounds + 1):
        dist.barrier()
        start = time.perf_counter()
        got = ranks.from_rank_0(lambda: report)
        times.append(time.perf_counter() - start)
    if rank == 1:
        assert got.num_examples == n and len(got.source.records) == n
        print(f"broadcast of the listed report, rank 1: median {statistics.median(times[1:]):.2f}"
              f" s over {rounds} (min {min(times[1:]):.2f}, max {max(times[1:]):.2f})")  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()
    size = len(pickle.dumps(listed(args.examples)))
    print(f"{args.examples} examples: listed report pickles to {size / 1e6:.1f} MB "
          f"(built and pickled in {time.perf_counter() - start:.2f} s)")  # fmt: skip
    import torch.multiprocessing as mp
    from dp_support import free_port

    mp.spawn(worker, args=(free_port(), args.examples, args.rounds), nprocs=2, join=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))
    main()
