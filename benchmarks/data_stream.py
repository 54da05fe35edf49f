"""S3 data streaming benchmark: dataset images/s vs a raw parallel-GET loop on the same
SeaweedFS server, and time-to-first-batch at 100 and 10,000 objects. One run prints all.

    .venv/bin/python benchmarks/data_stream.py [--images 2000] [--big 10000]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from s3server import start_server  # noqa: E402

from kubetune.config import SdTextualInversionConfig  # noqa: E402
from kubetune.dataset.images import decode_image  # noqa: E402
from kubetune.dataset.sources import FETCH_WORKERS  # noqa: E402
from kubetune.storage import open_store  # noqa: E402
from runner.data import build_train_dataloader  # noqa: E402


def _png(side: int, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(array).save(out, "PNG")
    return out.getvalue()


def upload(client: Any, bucket: str, prefix: str, n: int, side: int) -> list[str]:
    """n PNGs under prefix/ (uploaded in parallel); returns their keys."""
    keys = [f"{prefix}/img-{i:06d}.png" for i in range(n)]
    blobs = [_png(side, i % 64) for i in range(64)]
    with ThreadPoolExecutor(32) as pool:
        list(
            pool.map(
                lambda i: client.put_object(Bucket=bucket, Key=keys[i], Body=blobs[i % 64]),
                range(n),
            )
        )
    return keys


def config(uri: str, resolution: int) -> SdTextualInversionConfig:
    return SdTextualInversionConfig.model_validate(
        {
            "base_output_dir": "/tmp/kubetune-bench",
            "max_train_steps": 1,
            "save_every_n_steps": 1,
            "placeholder_token": "<x>",
            "initializer_token": "x",
            "data_loader": {
                "dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": uri},
                "resolution": resolution,
                "caption_preset": "object",
            },
        }
    )


def raw_loop(client: Any, bucket: str, keys: list[str], decode: bool) -> float:
    """images/s of a plain ThreadPool GET loop (optionally decoding), same concurrency."""

    def get(key: str) -> int:
        data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if decode:
            decode_image(data, key)
        return len(data)

    start = time.perf_counter()
    with ThreadPoolExecutor(FETCH_WORKERS) as pool:
        list(pool.map(get, keys))
    return len(keys) / (time.perf_counter() - start)


def dataset_rate(uri: str, resolution: int, batch_size: int) -> tuple[float, int]:
    loader = build_train_dataloader(
        config(uri, resolution), seed=0, batch_size=batch_size, device_is_cuda=False
    )
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["id"])
    return count / (time.perf_counter() - start), count


def first_batch_s(uri: str, batch_size: int) -> float:
    start = time.perf_counter()
    loader = build_train_dataloader(
        config(uri, 32), seed=0, batch_size=batch_size, device_is_cuda=False
    )
    next(iter(loader))
    return time.perf_counter() - start


def list_s(uri: str) -> float:
    """Seconds to list every key under uri (the floor under time-to-first-batch)."""
    start = time.perf_counter()
    sum(1 for _ in open_store(uri).list())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=2000, help="objects for the rate test")
    parser.add_argument("--side", type=int, default=64, help="image side for the rate test")
    parser.add_argument("--big", type=int, default=10_000, help="objects for the big TTFB test")
    args = parser.parse_args()
    with start_server() as server:
        for name, value in server.env().items():
            os.environ[name] = value
        client = server.client()
        bucket = server.create_bucket("bench")
        keys = upload(client, bucket, "rate", args.images, args.side)
        upload(client, bucket, "small", 100, 8)
        upload(client, bucket, "big", args.big, 8)
        raw_loop(client, bucket, keys[:200], decode=False)  # warm connections
        raw = raw_loop(client, bucket, keys, decode=False)
        raw_dec = raw_loop(client, bucket, keys, decode=True)
        rate, n = dataset_rate(f"s3://{bucket}/rate", args.side, batch_size=32)
        small = first_batch_s(f"s3://{bucket}/small", 8)
        big = first_batch_s(f"s3://{bucket}/big", 8)
        listing = list_s(f"s3://{bucket}/big")
    print(
        f"objects: {n} PNGs {args.side}x{args.side} (~{len(_png(args.side, 0)) // 1024} KiB), "
        f"{FETCH_WORKERS} parallel GETs, {os.cpu_count()} CPUs"
    )
    print(f"raw parallel GET            : {raw:8.0f} images/s")
    print(f"raw parallel GET + decode   : {raw_dec:8.0f} images/s")
    print(
        f"kubetune dataset (batch 32) : {rate:8.0f} images/s  "
        f"= {rate / raw:.2f}x raw GET, {rate / raw_dec:.2f}x raw GET+decode"
    )
    print(f"time to first batch, 100    : {small * 1000:8.0f} ms")
    print(
        f"time to first batch, {args.big:<6d} : {big * 1000:8.0f} ms  "
        f"= {big / small:.1f}x the 100-object time for {args.big // 100}x the objects"
    )
    print(f"  of which listing {args.big} keys: {listing * 1000:8.0f} ms")


if __name__ == "__main__":
    main()
