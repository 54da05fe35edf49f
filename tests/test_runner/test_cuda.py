"""The issue #28 checks on a real GPU (skipped without CUDA; nothing here has run yet: no GPU
was at hand when they were written). On a GPU machine:

    pytest tests/test_runner/test_cuda.py && python benchmarks/gpu_bench.py

- steady-state training steps make no host-device sync at all, C++ ones included
  (``torch.cuda.set_sync_debug_mode``), for LoRA SD / SDXL and TI, with the knobs that used to
  sync (lora_dropout, biased timesteps, ema_on_cpu, cached encoders);
- the float32 VAE computes in float32 under fp16 autocast, and fp16's GradScaler (accelerate's,
  not faked as on CPU) skips an overflowing step and lowers its scale;
- the encoder caches spill to pinned host memory beyond their budget.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import (
    make_config,
    model_for,
    reset_accelerate,
    train,
    training_images,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.timeout(900),
]
CUDA = torch.device("cuda")


data_dir = training_images(n=4)


def _cuda_pipeline(cfg: Any) -> tuple[Any, Any]:
    from runner.models.loading import load_model
    from runner.pipelines import build_pipeline
    from runner.session.load import place_models
    from runner.session.settings import model_settings

    comps = load_model(model_settings(cfg))
    place_models(comps, cfg.weight_dtype, CUDA)
    return comps, build_pipeline(cfg, comps, CUDA, total_steps=4)


CASES = {
    "sd-lora": ("SD_LORA", {}),
    "sdxl-lora-bf16": ("SDXL_LORA", {"weight_dtype": "bfloat16", "mixed_precision": "bf16"}),
    "sd-ti": ("SD_TEXTUAL_INVERSION", {"timestep_sampling": "earlier"}),
    "sd-lora-knobs": ("SD_LORA", {"lora_dropout": 0.1, "ema_decay": 0.9, "ema_on_cpu": True,
                                  "timestep_sampling": "later", "train_batch_size": 1}),
    "sd-lora-cached": ("SD_LORA", {"cache_vae_outputs": True, "cache_text_encoder_outputs": True,
                                   "train_text_encoder": False, "encoder_cache_device_mb": 0}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_steady_state_steps_make_no_sync_on_cuda(
    case: str,
    request: pytest.FixtureRequest,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from runner.training import loop

    kind, fields = CASES[case]
    model = model_for(kind, request)
    seen: list[str] = []
    run = loop.StepRunner.run

    def watched(self: Any, group: list[Any], step: int) -> torch.Tensor:
        if step < 1:
            return run(self, group, step)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return run(self, group, step)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                seen.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))

    monkeypatch.setattr(loop.StepRunner, "run", watched)
    cfg = make_config(kind, model, data_dir, tmp_path, max_train_steps=4,
                      log_every_n_steps=100, save_every_n_steps=4, **fields)  # fmt: skip
    assert train(cfg).step == 4
    assert seen == []


def test_float32_vae_and_grad_scaler_under_fp16_on_cuda(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from accelerate import Accelerator

    from runner.training.loop import StepRunner
    from runner.training.optim import build_lr_scheduler, build_optimizer

    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, weight_dtype="float32",
                      mixed_precision="fp16")  # fmt: skip
    reset_accelerate()
    accelerator = Accelerator(mixed_precision="fp16")
    assert accelerator.scaler is not None
    comps, pipe = _cuda_pipeline(cfg)
    optimizer = accelerator.prepare(build_optimizer(cfg.optimizer, pipe.param_groups(), CUDA))
    schedule = build_lr_scheduler("linear", optimizer, warmup_steps=0, total_steps=10)
    pipe.set_train(True)
    runner = StepRunner(accelerator, pipe, optimizer, schedule,
                        torch.Generator(CUDA).manual_seed(0), 1.0)  # fmt: skip
    dtypes: dict[str, set[torch.dtype]] = {"vae": set(), "unet": set()}
    hooks = [comps.vae.encoder.conv_in.register_forward_hook(
                 lambda _m, _i, o: dtypes["vae"].add(o.dtype)),
             comps.unet.conv_in.register_forward_hook(
                 lambda _m, _i, o: dtypes["unet"].add(o.dtype))]  # fmt: skip
    params = list(pipe.trainable_parameters().values())
    before = [p.detach().clone() for p in params]
    scale = accelerator.scaler.get_scale()
    poison = params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": ["a kbtn"] * 2,
             "id": ["a", "b"]}  # fmt: skip
    runner.run([batch], 0)
    poison.remove()
    for hook in hooks:
        hook.remove()
    assert dtypes == {"vae": {torch.float32}, "unet": {torch.float16}}
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert accelerator.scaler.get_scale() < scale
    runner.run([batch], 1)
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    reset_accelerate()


def test_caches_beyond_the_budget_wait_in_pinned_host_memory() -> None:
    from runner.training.memory_cache import BoundedCache, DeviceBudget

    cache: BoundedCache[str] = BoundedCache(CUDA, DeviceBudget(limit=64))
    cache["a"] = (torch.ones(16, device=CUDA), None)
    cache["b"] = (torch.ones(16, device=CUDA), None)
    assert cache.stored("a")[0].is_cuda  # type: ignore[union-attr]
    spilled = cache.stored("b")[0]
    assert spilled is not None and spilled.device.type == "cpu" and spilled.is_pinned()
    assert cache["b"][0].is_cuda  # type: ignore[union-attr]
