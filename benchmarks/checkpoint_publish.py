"""Checkpoint publishing benchmark, in one run against a SeaweedFS started on 127.0.0.1.

1. Training stall per checkpoint vs serialisation time: a simulated training loop (a sleep
   per step stands in for GPU work) writes a checkpoint folder every ``--every`` steps and
   hands it to ``CheckpointManager.save_async``; the stall is the time the loop spends in
   serialise + save_async (the latter includes back-pressure when the previous upload is
   still running).
2. Upload throughput: ``CheckpointManager.save`` (sha256 + upload + manifest + prune) vs a
   plain s3transfer ``TransferManager`` uploading the same files concurrently.

Usage: .venv/bin/python benchmarks/checkpoint_publish.py [--size-mb 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3server import S3Server, start_server  # noqa: E402

from kubetune.checkpoint.publish import CheckpointManager  # noqa: E402
from kubetune.storage import open_store  # noqa: E402

MiB = 2**20


def _state(size_mb: int, files: int) -> dict[str, bytes]:
    """A fake training state: one large 'optimizer' blob, the rest split evenly."""
    total = size_mb * MiB
    big = total // 2
    rest = (total - big) // max(1, files - 1)
    blobs = {"optimizer.bin": os.urandom(big)}
    for i in range(files - 1):
        blobs[f"weights-{i}.safetensors"] = os.urandom(rest)
    return blobs


def _serialise(state: dict[str, bytes], out: Path) -> float:
    """Write the state to ``out`` (fsynced, like a real checkpoint writer); seconds taken."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for name, data in state.items():
        with open(out / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return time.perf_counter() - start


def bench_stall(
    server: S3Server,
    bucket: str,
    state: dict[str, bytes],
    work: Path,
    steps: int,
    every: int,
    step_s: float,
) -> list[tuple[int, float, float]]:
    """(step, serialisation s, stall s) per checkpoint of a simulated training loop."""
    manager = CheckpointManager(open_store(f"s3://{bucket}/stall"), max_checkpoints=2)
    rows = []
    for step in range(1, steps + 1):
        time.sleep(step_s)  # the "GPU" step
        if step % every == 0:
            t0 = time.perf_counter()
            serialise = _serialise(state, work / f"buf-{(step // every) % 2}")
            manager.save_async(step, work / f"buf-{(step // every) % 2}")
            rows.append((step, serialise, time.perf_counter() - t0))
    manager.wait()
    return rows


def _plain_s3transfer(server: S3Server, bucket: str, folder: Path, prefix: str) -> float:
    from s3transfer.manager import TransferConfig, TransferManager

    client = server.client(max_attempts=5)
    config = TransferConfig(
        multipart_threshold=16 * MiB, multipart_chunksize=16 * MiB, max_request_concurrency=8
    )
    start = time.perf_counter()
    with TransferManager(client, config) as manager:
        futures = [manager.upload(str(p), bucket, f"{prefix}/{p.name}") for p in folder.iterdir()]
        for future in futures:
            future.result()
    return time.perf_counter() - start


def bench_throughput(
    server: S3Server, bucket: str, folder: Path, repeats: int
) -> tuple[list[float], list[float]]:
    """Seconds per upload of ``folder``: CheckpointManager.save vs plain s3transfer."""
    manager = CheckpointManager(open_store(f"s3://{bucket}/tput"), max_checkpoints=1)
    ours, plain = [], []
    for i in range(repeats):
        start = time.perf_counter()
        manager.save(i + 1, folder)
        ours.append(time.perf_counter() - start)
        plain.append(_plain_s3transfer(server, bucket, folder, f"plain/{i}"))
    return ours, plain


def _report_stall(
    server: S3Server,
    bucket: str,
    state: dict[str, bytes],
    work: Path,
    args: argparse.Namespace,
    step_s: float,
) -> None:
    every_s = step_s * args.every
    print(
        f"\n{args.size_mb} MiB in {args.files} files; {args.steps} steps of "
        f"{step_s * 1000:.0f} ms, a checkpoint every {args.every} steps ({every_s:.1f} s)"
    )
    rows = bench_stall(server, bucket, state, work, args.steps, args.every, step_s)
    print(f"{'step':>6} {'serialise s':>12} {'stall s':>9} {'stall/serialise':>16}")
    for step, ser, stall in rows:
        print(f"{step:>6} {ser:>12.3f} {stall:>9.3f} {stall / ser:>16.2f}")
    ser_med = statistics.median(r[1] for r in rows)
    stall_med = statistics.median(r[2] for r in rows)
    print(
        f"median: serialise {ser_med:.3f} s, stall {stall_med:.3f} s, "
        f"stall/serialise {stall_med / ser_med:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=64, help="checkpoint size")
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="checkpoint every N steps")
    parser.add_argument(
        "--step-s",
        default="0.4,0.05",
        help="simulated step times to try (comma-separated): a cadence the upload keeps up "
        "with, and one where back-pressure slows training",
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    state = _state(args.size_mb, args.files)
    with start_server() as server, tempfile.TemporaryDirectory() as tmp:
        os.environ.update(server.env())
        bucket = server.create_bucket("bench")
        server.client().put_object(Bucket=bucket, Key="warm-up", Body=b"")
        work = Path(tmp)
        for step_s in (float(v) for v in args.step_s.split(",")):
            _report_stall(server, bucket, state, work, args, step_s)

        folder = work / "tput"
        _serialise(state, folder)
        ours, plain = bench_throughput(server, bucket, folder, args.repeats)
        mb = args.size_mb * MiB / 1e6
        ours_mbs, plain_mbs = mb / statistics.median(ours), mb / statistics.median(plain)
        print(f"\nupload of {mb:.0f} MB, median of {args.repeats}:")
        print(
            f"  CheckpointManager.save (sha256 + upload + manifest + prune): {ours_mbs:7.1f} MB/s"
        )
        print(
            f"  plain s3transfer TransferManager.upload:                      {plain_mbs:7.1f} MB/s"
        )
        print(f"  ratio ours/plain: {ours_mbs / plain_mbs:.2f}")


if __name__ == "__main__":
    main()
