"""GPU speed habits, checked on CPU: cached encoders leave the device during steps and come
back for validation, no host sync inside a step (one per log line), SDPA attention, fused /
8-bit AdamW choices, pinned copies only on CUDA."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import make_config, model_for, train, training_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]  # tiny_sd_dir / tiny_sdxl_dir


data_dir = training_images(n=4)


def _cached(kind: str, model: Path, data: Path, out: Path, **kw: Any) -> Any:
    return make_config(
        kind,
        model,
        data,
        out,
        cache_vae_outputs=True,
        cache_text_encoder_outputs=True,
        train_text_encoder=False,
        **kw,
    )


def _param_devices(pipeline: Any) -> set[str]:
    comps = pipeline.comps
    return {p.device.type for m in (comps.vae, *comps.text_encoders) for p in m.parameters()}


@pytest.mark.parametrize("kind", ["SD_LORA", pytest.param("SDXL_LORA", marks=pytest.mark.slow)])
def test_cached_encoders_are_off_the_device_during_steps(
    kind: str,
    request: pytest.FixtureRequest,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Offload to ``meta`` (weights gone): any use of the VAE / text encoders in a step would
    fail, and the trained weights must equal an ordinary cached run's bit for bit."""
    from safetensors.torch import load_file

    from runner.pipelines import base as common

    model = model_for(kind, request)
    reference = train(_cached(kind, model, data_dir, tmp_path / "ref"))
    seen: list[set[str]] = []
    original_loss = common.TrainingPipeline.loss

    def loss(self: Any, batch: Any, generator: torch.Generator) -> torch.Tensor:
        seen.append(_param_devices(self))
        return original_loss(self, batch, generator)

    monkeypatch.setattr(common, "OFFLOAD_DEVICE", torch.device("meta"))
    monkeypatch.setattr(common.TrainingPipeline, "loss", loss)
    result = train(_cached(kind, model, data_dir, tmp_path / "meta"))
    assert result.step == reference.step == 4
    assert seen == [{"meta"}] * 4  # every micro-batch ran with the encoders away
    step = "checkpoints/step-000004/trainable.safetensors"
    expected, got = load_file(tmp_path / "ref" / step), load_file(tmp_path / "meta" / step)
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_validation_brings_offloaded_encoders_back(
    tiny_sd_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where ``set_train`` sends the encoders: training device for validation, away after."""
    from runner.data import build_train_dataloader, cache_batches
    from runner.models.loading import load_model
    from runner.pipelines import base as common
    from runner.pipelines import build_pipeline
    from runner.session.settings import model_settings

    cfg = _cached("SD_LORA", tiny_sd_dir, data_dir, tmp_path)
    comps = load_model(model_settings(cfg))
    device = torch.device("cpu")
    pipeline = build_pipeline(cfg, comps, device, total_steps=4)
    moves: list[tuple[str, str]] = []
    original_to = torch.nn.Module.to

    def to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        names = {id(comps.vae): "vae", id(comps.text_encoder): "text_encoder"}
        if id(self) in names:
            moves.append((names[id(self)], str(args[0] if args else kwargs.get("device"))))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(common, "OFFLOAD_DEVICE", torch.device("cpu", 0))  # distinguishable
    monkeypatch.setattr(torch.nn.Module, "to", to)
    loader = build_train_dataloader(cfg, seed=1, batch_size=2, device_is_cuda=False)
    pipeline.warm_caches(cache_batches(loader))
    assert len(pipeline.latents.cache or {}) == 4 and len(pipeline.text.cache or {}) == 4
    assert loader.sampler.position == 0  # warming does not consume the loader
    assert moves == [("vae", "cpu:0"), ("text_encoder", "cpu:0")]
    pipeline.set_train(False)
    assert moves[2:] == [("vae", "cpu"), ("text_encoder", "cpu")]
    pipeline.set_train(True)
    assert moves[4:] == [("vae", "cpu:0"), ("text_encoder", "cpu:0")]


def test_no_host_sync_inside_a_step_only_per_log_line(
    tiny_sd_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``.item()`` & co. (a device sync on CUDA) never run inside ``StepRunner.run`` or the
    per-step progress update; the log line is the one place the loss is read."""
    from runner.reporting import progress
    from runner.training import loop

    counts = {"step": 0, "emit": 0, "lines": 0, "optimizer": 0}
    where: list[str] = []

    def tracked(key: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            where.append(key)
            try:
                return fn(*args, **kwargs)
            finally:
                where.pop()

        return wrapper

    for name in ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy"):
        method = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *a: Any, _m: Any = method, **k: Any) -> Any:
            if where:
                counts[where[-1]] += 1
            return _m(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    emit = progress.ProgressReporter._emit

    def emit_line(self: Any, *a: Any, **k: Any) -> Any:
        counts["lines"] += 1
        return tracked("emit", emit)(self, *a, **k)

    monkeypatch.setattr(loop.StepRunner, "run", tracked("step", loop.StepRunner.run))
    # unfused AdamW (CPU) keeps its step counter on the host and reads it there; on CUDA
    # kubetune uses fused AdamW, whose counter stays on the device
    monkeypatch.setattr(torch.optim.AdamW, "step", tracked("optimizer", torch.optim.AdamW.step))
    update = progress.ProgressReporter.update
    monkeypatch.setattr(progress.ProgressReporter, "update", tracked("step", update))
    monkeypatch.setattr(progress.ProgressReporter, "_emit", emit_line)
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        tmp_path,
        max_train_steps=4,
        gradient_accumulation_steps=2,
        train_batch_size=1,
    )
    assert train(cfg).step == 4
    assert counts["step"] == 0
    assert counts["lines"] >= 1 and counts["emit"] == counts["lines"]


@pytest.mark.parametrize("kind", ["SD_LORA", "SDXL_LORA"])
def test_unet_attention_uses_sdpa(
    kind: str, request: pytest.FixtureRequest, data_dir: Path, tmp_path: Path
) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from runner.models.loading import load_model
    from runner.session.settings import model_settings
    from runner.training.speed import ensure_sdpa, use_channels_last

    model = model_for(kind, request)
    comps = load_model(model_settings(make_config(kind, model, data_dir, tmp_path)))
    processors = comps.unet.attn_processors.values()
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors)
    comps.unet.set_attn_processor(AttnProcessor())  # the slow path, as a plugin might set
    ensure_sdpa(comps.unet)
    assert all(isinstance(p, AttnProcessor2_0) for p in comps.unet.attn_processors.values())
    assert not use_channels_last(comps.unet, torch.device("cpu"))  # CPU layout untouched
    conv = comps.unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)


def test_adamw_fused_on_cuda() -> None:
    """(8-bit AdamW: tests/test_runner/test_adam8bit.py.)"""
    from kubetune.config import AdamOptimizerConfig
    from runner.training.optim import build_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.ones(2))]}]
    plain = build_optimizer(AdamOptimizerConfig(), groups, torch.device("cpu"))
    assert not plain.defaults["fused"]
    # the choice made for a CUDA device (fused kernels exist for CPU tensors too)
    fused = build_optimizer(AdamOptimizerConfig(), groups, torch.device("cuda"))
    assert fused.defaults["fused"] is True


def test_host_to_device_copy_helper_leaves_cpu_tensors_alone() -> None:
    from runner.training.speed import to_device

    t = torch.arange(4)
    assert to_device(t, torch.device("cpu")) is t and not t.is_pinned()
