"""Client cost of one ranged header read (the first 16 KiB of an image) on SeaweedFS at
127.0.0.1: boto3's `get_object(Range=…)` against kubetune's path (`CloudStore.get_range`,
obstore), serial (wall and client CPU per request) and with 16 threads
(requests/s).
Interleaved rounds; ratios from one run.

    .venv/bin/python benchmarks/s3_header_reads.py /var/tmp/kubetune-photos --images 1500
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

HEADER = 16 * 1024


def serial(read: Callable[[str], bytes], keys: list[str]) -> tuple[float, float]:
    """(ms wall, ms client CPU) per request, reading every key once in order."""
    wall, cpu = time.perf_counter(), time.process_time()
    for key in keys:
        read(key)
    n = len(keys)
    return 1000 * (time.perf_counter() - wall) / n, 1000 * (time.process_time() - cpu) / n


def parallel(read: Callable[[str], bytes], keys: list[str], threads: int = 16) -> float:
    """Requests per second with `threads` threads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, keys))
    return len(keys) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("photos", type=Path, help="folder from make_photos.py")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    from s3server import start_server

    from kubetune.storage import open_store

    server = start_server()
    try:
        client = server.client()
        bucket = server.create_bucket("bench")
        rows = (a.photos / "data.jsonl").read_text().splitlines()[: a.images]
        names = [json.loads(r)["image"] for r in rows]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda n: client.put_object(
                Bucket=bucket, Key=f"h/{n}", Body=(a.photos / n).read_bytes()), names))  # fmt: skip
        os.environ.update(server.env())
        store = open_store(f"s3://{bucket}/h")
        readers: dict[str, Callable[[str], bytes]] = {
            "boto3 get_object": lambda n: client.get_object(
                Bucket=bucket, Key=f"h/{n}", Range=f"bytes=0-{HEADER - 1}"
            )["Body"].read(),  # fmt: skip
            "kubetune lean": lambda n: store.get_range(n, 0, HEADER),
        }
        for read in readers.values():  # warm: connections, first-call imports
            serial(read, names[:20])
        results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in readers}
        for r in range(a.rounds):
            for name, read in readers.items():
                ms, cpu = serial(read, names)
                rps = parallel(read, names)
                results[name].append((ms, cpu, rps))
                print(f"round {r}: {name:17s} serial {ms:.3f} ms/req, client CPU {cpu:.3f} "
                      f"ms/req; 16 threads {rps:,.0f} req/s", flush=True)  # fmt: skip
        med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
        (b_ms, b_cpu, b_rps), (k_ms, k_cpu, k_rps) = med["boto3 get_object"], med["kubetune lean"]
        print(f"{a.images} ranged reads of {HEADER // 1024} KiB (median round): client CPU per "
              f"request kubetune / boto3 = {k_cpu / b_cpu:.2f}; serial wall {k_ms / b_ms:.2f}; "
              f"16-thread throughput {k_rps / b_rps:.2f}x")  # fmt: skip
    finally:
        server.stop()


if __name__ == "__main__":
    main()
