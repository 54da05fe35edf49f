"""Encoder-output caches bounded on the device (issue #28): entries beyond
``encoder_cache_device_mb`` wait in host memory (pinned when CUDA is available) and train the
same weights; with ``random_flip`` both orientations' latents are cached and a cached run
trains as an uncached one does; a cache miss encodes on the training device."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import (
    checkpoint_weights,
    load_pipeline,
    make_config,
    train,
    training_images,
)

from kubetune.config import parse_config
from runner.training.memory_cache import BoundedCache, DeviceBudget

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(300)
CPU = torch.device("cpu")


data_dir = training_images(n=4)


def test_entries_beyond_the_budget_wait_in_host_memory() -> None:
    budget = DeviceBudget(limit=2 * 16 * 4)  # two entries of 16 float32 values
    latents: BoundedCache[str] = BoundedCache(CPU, budget)
    texts: BoundedCache[str] = BoundedCache(CPU, budget)  # one budget for both caches
    rows = torch.arange(64, dtype=torch.float32).view(4, 16)
    latents["a"] = (rows[0], None)
    texts["t"] = (rows[1], None)
    latents["b"] = (rows[2], None)
    latents["a"] = (rows[3], None)  # first write wins
    assert budget.used == 2 * 16 * 4
    assert latents.spilled == {"b"} and texts.spilled == set()
    assert torch.equal(latents["a"][0], rows[0]) and torch.equal(latents["b"][0], rows[2])
    assert latents["b"][1] is None
    assert latents.stored("a")[0].untyped_storage().nbytes() == 16 * 4  # not the batch's
    assert latents.stored("b")[0].is_pinned() == torch.cuda.is_available()
    assert sorted(latents) == ["a", "b"] and len(latents) == 2 and "c" not in latents


@pytest.mark.slow
def test_a_zero_budget_spills_everything_and_trains_the_same_weights(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.pipelines.base import TrainingPipeline

    common = dict(cache_vae_outputs=True, cache_text_encoder_outputs=True,
                  train_text_encoder=False)  # fmt: skip
    seen: list[TrainingPipeline] = []
    warm = TrainingPipeline.warm_caches

    def recorded(self: TrainingPipeline, batches: Any) -> None:
        seen.append(self)
        warm(self, batches)

    monkeypatch.setattr(TrainingPipeline, "warm_caches", recorded)
    train(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path / "gpu", **common))
    train(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path / "host",
                      encoder_cache_device_mb=0, **common))  # fmt: skip
    roomy, tight = seen
    assert roomy.latents.cache is not None and tight.latents.cache is not None
    assert not roomy.latents.cache.spilled and len(tight.latents.cache.spilled) == 4
    assert tight.text.cache is not None and len(tight.text.cache.spilled) == 4
    expected, got = (
        checkpoint_weights(tmp_path / "gpu", 4),
        checkpoint_weights(tmp_path / "host", 4),
    )
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_random_flip_with_cached_latents_is_accepted(tiny_sd_dir: Path, data_dir: Path) -> None:
    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, Path("out"), cache_vae_outputs=True)
    raw = cfg.model_dump(mode="json")
    raw["data_loader"]["random_flip"] = True
    import yaml

    assert parse_config(yaml.safe_dump(raw)).data_loader.random_flip


@pytest.mark.slow
def test_flipped_latents_are_cached_and_train_as_uncached_flips_do(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Both orientations of every example cached at the start; 3 epochs of random flips
    (both orientations drawn) train the weights an uncached run trains (within a tenth of
    one optimizer step: batched encoding differs in the last float bits)."""
    from train_support import caption_loader

    common = dict(max_train_steps=None, max_train_epochs=3, save_every_n_steps=None,
                  save_every_n_epochs=3, train_text_encoder=False,
                  data_loader=caption_loader(data_dir, random_flip=True))  # fmt: skip
    plain = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path / "plain", **common)
    cached = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path / "cached",
                         cache_vae_outputs=True, **common)  # fmt: skip
    assert train(plain).step == train(cached).step == 6
    expected, got = (
        checkpoint_weights(tmp_path / "plain", 6),
        checkpoint_weights(tmp_path / "cached", 6),
    )
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4)


def test_flipped_moments_are_the_mirror_images_moments(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from train_support import caption_loader

    from runner.data import build_train_dataloader, cache_batches

    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, cache_vae_outputs=True,
                      data_loader=caption_loader(data_dir, random_flip=True))  # fmt: skip
    _, pipe = load_pipeline(cfg)
    loader = build_train_dataloader(cfg, seed=1, batch_size=2, device_is_cuda=False)
    batch = next(iter(cache_batches(loader)))
    pipe.latents.fill(batch, CPU)
    cache = pipe.latents.cache
    assert cache is not None and len(cache) == 4  # two examples, both orientations
    example, flipped = batch["id"][0], batch["flipped"][0]
    pixels = batch["pixel_values"][:1]
    mirror_mean, _ = pipe.latents._moments(pixels.flip(-1), CPU)
    torch.testing.assert_close(cache[(example, not flipped)][0], mirror_mean[0])


def test_a_cache_miss_encodes_on_the_training_device(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After warming, the VAE waits on the offload device; an example missing from the cache
    brings it to the training device for its encoding and sends it back. (The offload device
    here is ``meta``, recorded but not really moved to, so the weights stay usable.)"""
    from runner.data import build_train_dataloader, cache_batches
    from runner.pipelines import base

    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, cache_vae_outputs=True)
    comps, pipe = load_pipeline(cfg)
    away = torch.device("meta")
    monkeypatch.setattr(base, "OFFLOAD_DEVICE", away)
    loader = build_train_dataloader(cfg, seed=1, batch_size=2, device_is_cuda=False)
    batches = list(cache_batches(loader))
    moves: list[str] = []
    to, device_of = torch.nn.Module.to, base._device_of
    where = {id(comps.vae): CPU}

    def recorded_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if self is comps.vae:
            moves.append(str(args[0]))
            where[id(self)] = torch.device(args[0])
            if where[id(self)] == away:
                return self
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recorded_to)
    monkeypatch.setattr(base, "_device_of", lambda m: where.get(id(m), device_of(m)))
    pipe.warm_caches(batches[1:])  # the first batch's examples stay uncached
    assert moves == ["meta"]
    pipe.latents.sample(batches[0], CPU, torch.Generator().manual_seed(0))
    assert moves == ["meta", "cpu", "meta"]
    assert pipe.latents.cache is not None and len(pipe.latents.cache) == 4


def test_an_encoder_already_on_the_device_is_not_moved(monkeypatch: pytest.MonkeyPatch) -> None:
    """``cuda`` (the accelerator's) and ``cuda:0`` (a parameter's) are one device: no
    ``Module.to`` walk per step for an encoder that never left."""
    from runner.pipelines import base

    assert base.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not base.same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not base.same_device(CPU, torch.device("cuda"))
    module = torch.nn.Linear(2, 2)
    monkeypatch.setattr(base, "_device_of", lambda m: torch.device("cuda", 0))
    moved: list[Any] = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(a) or self)
    with base.on_device([module], torch.device("cuda")):
        pass
    assert moved == []
