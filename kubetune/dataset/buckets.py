"""Aspect-ratio buckets (invoke-training's set) and which bucket an image goes in: pure, so
the runner's sampler and the launcher's dataset preview share them."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

from kubetune.config.data import AspectRatioBucketConfig
from kubetune.errors import ConfigError


def build_buckets(cfg: AspectRatioBucketConfig) -> list[tuple[int, int]]:
    """Sorted (h, w) buckets, invoke-training's set: for h = start_dim, start_dim +
    divisible_by … end_dim, w = the largest multiple of divisible_by with h·w <=
    target_resolution²; both (h, w) and (w, h). ``w`` may fall outside [start_dim, end_dim]."""
    step = cfg.divisible_by
    area = cfg.target_resolution**2
    buckets: set[tuple[int, int]] = set()
    for h in range(cfg.start_dim, cfg.end_dim + 1, step):
        w = (area // h) // step * step
        if w > 0:
            buckets.update({(h, w), (w, h)})
    if not buckets:
        raise ConfigError(
            [
                f"data_loader.aspect_ratio_buckets: no bucket fits target_resolution "
                f"{cfg.target_resolution} with sides from {cfg.start_dim} (lower start_dim)"
            ]
        )
    return sorted(buckets)


def closest_bucket(size_hw: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio (w/h) is closest; ties go to the first."""
    aspect = size_hw[1] / size_hw[0]
    return min(range(len(buckets)), key=lambda i: abs(buckets[i][1] / buckets[i][0] - aspect))


def assign_buckets(
    sizes_hw: Sequence[tuple[int, int]], buckets: Sequence[tuple[int, int]]
) -> list[int]:
    """``closest_bucket`` of every size, computed once per distinct size (a dataset of
    100,000 photos holds a few hundred sizes)."""
    known: dict[tuple[int, int], int] = {}
    out = []
    for size in sizes_hw:
        bucket = known.get(size)
        if bucket is None:
            bucket = known[size] = closest_bucket(size, buckets)
        out.append(bucket)
    return out


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any parts, identical in every process (no PYTHONHASHSEED)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def scan_order(n: int, seed: int, epoch: int) -> list[int]:
    """The seeded order in which `aspect_ratio_buckets.order: streaming` takes the ``n``
    examples in ``epoch`` (and in which the preflight reads their headers first)."""
    order = list(range(n))
    random.Random(derive_seed("scan", seed, epoch)).shuffle(order)
    return order
