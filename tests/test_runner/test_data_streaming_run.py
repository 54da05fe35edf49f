"""Whole runs in the streaming bucket order with the header checks beside training (the
threshold lowered so that nine images count as large), in this process: counted in epochs
(the schedule waits for every size, then trains exactly that many epochs), with two loader
workers, and with the VAE outputs cached. In every case each epoch takes every example
once, in one-bucket batches (a bucket smaller than a batch gives one short batch), and the
second epoch's order differs from the first's.

The batches are observed by wrapping ``ResumableLoader.__iter__`` (it only records what
each yields to training)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from data_fixtures import write_image_dir
from train_support import BUCKETS, make_config, streaming_loader, train

import kubetune.dataset.preflight as checks
from kubetune.config.data import AspectRatioBucketConfig
from kubetune.dataset.buckets import build_buckets, closest_bucket
from runner.data.loader import ResumableLoader

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SIZES = [(64, 64), (96, 48), (64, 64), (48, 96), (64, 64), (96, 48), (64, 64), (96, 48),
         (64, 64)]  # fmt: skip
"""(w, h): five square, three wide, one tall (a bucket smaller than the batch of 2)."""


def _observe(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[int]]]:
    seen: list[tuple[int, list[int]]] = []
    original = ResumableLoader.__iter__

    def observed(self: ResumableLoader) -> Any:
        for batch in original(self):
            sampler = self.sampler  # advanced past the batch already: maybe to the next epoch
            epoch = sampler.epoch - (1 if sampler.position == 0 else 0)
            seen.append((epoch, list(batch["index"])))
            yield batch

    monkeypatch.setattr(ResumableLoader, "__iter__", observed)
    return seen


def _bucket_of(data: Path) -> list[int]:
    """Each example's bucket, in the listing's order (file names sort as written)."""
    buckets = build_buckets(AspectRatioBucketConfig(**BUCKETS))
    return [closest_bucket((h, w), buckets) for w, h in SIZES]


@pytest.mark.parametrize(
    "fields",
    [
        {"max_train_epochs": 2, "max_train_steps": None},
        {"max_train_steps": 9, "data_loader": {"dataloader_num_workers": 2}},
        {"max_train_steps": 9, "cache_vae_outputs": True},
    ],
    ids=["epochs", "two-workers", "vae-cache"],
)
def test_a_streaming_run_takes_every_example_once_per_epoch(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch, fields: dict
) -> None:
    monkeypatch.setattr(checks, "DEFERRED_CHECKS_MIN_EXAMPLES", 2)
    data = tmp_path / "data"
    write_image_dir(data, SIZES)
    loader = streaming_loader(data, **fields.pop("data_loader", {}))
    cfg = make_config("SD_LORA", tiny_sd_dir, data, tmp_path / "out", data_loader=loader,
                      save_every_n_steps=100, **fields)  # fmt: skip
    seen = _observe(monkeypatch)
    result = train(cfg)
    bucket = _bucket_of(data)
    per_epoch = sum(-(-n // 2) for n in Counter(bucket).values())  # 3 + 2 + 1 batches
    assert result.step == len(seen) == (2 * per_epoch if "max_train_epochs" in fields else 9)
    epochs = [[b for e, b in seen if e == epoch] for epoch in (0, 1)]
    assert len(epochs[0]) == per_epoch
    for batches in epochs:
        assert all(len({bucket[i] for i in b}) == 1 for b in batches), batches
    assert sorted(i for b in epochs[0] for i in b) == list(range(len(SIZES)))
    if "max_train_epochs" in fields:
        assert sorted(i for b in epochs[1] for i in b) == list(range(len(SIZES)))
    assert epochs[1] != epochs[0][: len(epochs[1])]
