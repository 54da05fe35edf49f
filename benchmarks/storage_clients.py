"""kubetune's storage path (`CloudStore`, obstore underneath) against the raw obstore client and
against boto3, on the same SeaweedFS at 127.0.0.1: ranged 16 KiB reads (16 threads, and the
client CPU per request serially), a full listing of the objects, and a 100 MiB file upload.
Interleaved rounds (the clients' order rotates each round); medians and ratios.

    .venv/bin/python benchmarks/storage_clients.py --objects 3000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

HEADER = 16 * 1024
MiB = 2**20


def threaded(read: Callable[[str], Any], keys: list[str], threads: int = 16) -> float:
    """Requests per second with ``threads`` threads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(read, keys))
    return len(keys) / (time.perf_counter() - start)


def cpu_per_request(read: Callable[[str], Any], keys: list[str]) -> float:
    """Client CPU in ms per request, reading ``keys`` one after another."""
    start = time.process_time()
    for key in keys:
        read(key)
    return 1000 * (time.process_time() - start) / len(keys)


def timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def clients(server: Any, bucket: str) -> dict[str, dict[str, Callable[..., Any]]]:
    """Per client: ``read(key)``, ``listing()``, ``upload(key, path)``."""
    import obstore as obs
    from obstore.store import S3Store

    from kubetune.storage import open_store

    os.environ.update(server.env())
    store = open_store(f"s3://{bucket}")
    raw = S3Store(bucket, endpoint=server.endpoint, region=server.region,
                  access_key_id=server.access_key, secret_access_key=server.secret_key,
                  virtual_hosted_style_request=False,
                  client_options={"allow_http": True})  # fmt: skip
    boto = server.client()
    chunk = 16 * MiB  # kubetune's multipart part size, given to the raw client too
    return {
        "kubetune": {
            "read": lambda k: store.get_range(k, 0, HEADER),
            "listing": lambda: sum(1 for _ in store.list("r/")),
            "upload": lambda k, p: store.put_file(k, p),
        },
        "raw obstore": {
            "read": lambda k: obs.get_range(raw, k, start=0, length=HEADER),
            "listing": lambda: sum(len(c) for c in obs.list(raw, "r", chunk_size=1000)),
            "upload": lambda k, p: obs.put(raw, k, Path(p), chunk_size=chunk, max_concurrency=8),
        },
        "boto3": {
            "read": lambda k: boto.get_object(Bucket=bucket, Key=k,
                                              Range=f"bytes=0-{HEADER - 1}")["Body"].read(),
            "listing": lambda: sum(len(p.get("Contents", [])) for p in boto.get_paginator(
                "list_objects_v2").paginate(Bucket=bucket, Prefix="r/")),
            "upload": lambda k, p: boto.upload_file(str(p), bucket, k),
        },
    }  # fmt: skip


def fill(server: Any, bucket: str, n: int) -> list[str]:
    keys = [f"r/img-{i:06d}.jpg" for i in range(n)]
    body = os.urandom(64 * 1024)
    client = server.client()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: client.put_object(Bucket=bucket, Key=k, Body=body), keys))
    return keys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--upload-mib", type=int, default=100)
    a = parser.parse_args()
    from s3server import start_server

    server = start_server()
    try:
        bucket = server.create_bucket("bench")
        keys = fill(server, bucket, a.objects)
        every = clients(server, bucket)
        with tempfile.TemporaryDirectory() as tmp:
            big = Path(tmp) / "big.bin"
            big.write_bytes(os.urandom(a.upload_mib * MiB))
            results = run_rounds(every, keys, big, a.rounds, server.client(), bucket)
        report(results, a)
    finally:
        server.stop()


Results = dict[str, dict[str, list[float]]]


def run_rounds(
    every: dict[str, dict[str, Callable[..., Any]]], keys: list[str], big: Path, rounds: int,
    admin: Any, bucket: str,
) -> Results:  # fmt: skip
    names = list(every)
    for c in every.values():  # warm: connections, first-call imports
        threaded(c["read"], keys[:64])
    results: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            c, row = every[name], results[name]
            row.setdefault("reads/s", []).append(threaded(c["read"], keys))
            row.setdefault("cpu ms/read", []).append(cpu_per_request(c["read"], keys[:1000]))
            row.setdefault("listing s", []).append(timed(c["listing"]))
            key = f"up/{name.replace(' ', '-')}-{r}"
            row.setdefault("upload s", []).append(timed(lambda c=c, key=key: c["upload"](key, big)))
            admin.delete_object(Bucket=bucket, Key=key)
            print(f"round {r}: {name:11s} " + ", ".join(
                f"{m} {v[-1]:.3f}" for m, v in row.items()), flush=True)  # fmt: skip
    return results


def report(results: dict[str, dict[str, list[float]]], a: argparse.Namespace) -> None:
    med = {n: {m: statistics.median(v) for m, v in row.items()} for n, row in results.items()}
    k, raw, boto = med["kubetune"], med["raw obstore"], med["boto3"]
    load = os.getloadavg()
    print(f"\n{a.objects} objects, {a.rounds} interleaved rounds, load {load[0]:.1f} "
          f"{load[1]:.1f} {load[2]:.1f} (medians; speed ratios: >1 = kubetune faster)")  # fmt: skip
    print(f"{'':12s} {'reads/s':>9s} {'cpu ms/read':>12s} {'listing s':>10s} {'upload s':>9s}")
    for name, row in med.items():
        print(f"{name:12s} {row['reads/s']:9.0f} {row['cpu ms/read']:12.3f} "
              f"{row['listing s']:10.3f} {row['upload s']:9.2f}")  # fmt: skip
    for other, o in (("raw obstore", raw), ("boto3", boto)):
        print(f"kubetune vs {other:11s}: reads {k['reads/s'] / o['reads/s']:.2f}x, listing "
              f"{o['listing s'] / k['listing s']:.2f}x, {a.upload_mib} MiB upload "
              f"{o['upload s'] / k['upload s']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
