"""Numerics under mixed precision (issue #28), checked on CPU: a float32 VAE computes in
float32 inside the training step's and validation's autocast (the diffusers examples and
invoke-training encode outside autocast; an fp16 SDXL VAE overflows), the EMA updates for
every training type, and the fp16 path (autocast + GradScaler) skips a step whose gradients
overflow and lowers the scale."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import (
    load_pipeline,
    make_config,
    model_for,
    reset_accelerate,
    training_images,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(180)
CPU = torch.device("cpu")


data_dir = training_images(n=2)


def _batch() -> dict[str, Any]:
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {
        "pixel_values": pixels,
        "caption": ["a kbtn picture", "another kbtn picture"],
        "id": ["a", "b"],
        "original_size_hw": torch.tensor([[64, 64]] * 2),
        "crop_top_left_yx": torch.zeros(2, 2, dtype=torch.long),
    }


@contextlib.contextmanager
def dtypes_of(modules: dict[str, torch.nn.Module]) -> Iterator[dict[str, set[torch.dtype]]]:
    """Record the output dtype of each named module's forward calls."""
    seen: dict[str, set[torch.dtype]] = {name: set() for name in modules}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, _n=name: seen[_n].add(out.dtype)  # type: ignore[misc]
        )
        for name, module in modules.items()
    ]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def bf16_autocast() -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("cached", [False, True])
def test_float32_vae_encodes_in_float32_inside_training_autocast(
    cached: bool, tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The step runs under the accelerator's autocast (bf16 here); the VAE's convolutions
    still output float32 while the UNet's output bf16 (autocast was on). Cached: a cache miss
    inside the step encodes the same way."""
    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, cache_vae_outputs=cached)
    comps, pipe = load_pipeline(cfg)
    assert comps.vae.dtype == torch.float32
    watched = {"vae": comps.vae.encoder.conv_in, "vae_out": comps.vae.quant_conv,
               "unet": comps.unet.conv_in}  # fmt: skip
    with dtypes_of(watched) as seen, bf16_autocast():
        loss = pipe.loss(_batch(), torch.Generator().manual_seed(0))
    assert seen == {"vae": {torch.float32}, "vae_out": {torch.float32}, "unet": {torch.bfloat16}}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("kind", ["SD_LORA", "SDXL_LORA"])
def test_float32_vae_decodes_in_float32_inside_validation_autocast(
    kind: str, request: pytest.FixtureRequest, data_dir: Path, tmp_path: Path
) -> None:
    from kubetune.storage import open_store
    from runner.session.settings import validation_settings
    from runner.training.validation import Validator

    model = model_for(kind, request)
    cfg = make_config(kind, model, data_dir, tmp_path, validation_prompts=["a kbtn picture"],
                      validate_every_n_steps=1, num_validation_images_per_prompt=1,
                      num_validation_inference_steps=2)  # fmt: skip
    comps, pipe = load_pipeline(cfg)
    store = open_store(str(tmp_path / "store"))
    validator = Validator(validation_settings(cfg), pipe, store, CPU,
                          autocast=bf16_autocast)  # fmt: skip
    watched = {"decoder_in": comps.vae.decoder.conv_in, "decoder_out": comps.vae.decoder.conv_out,
               "unet": comps.unet.conv_in}  # fmt: skip
    with dtypes_of(watched) as seen:
        keys = validator.validate(1)
    assert seen == {"decoder_in": {torch.float32}, "decoder_out": {torch.float32},
                    "unet": {torch.bfloat16}}  # fmt: skip
    assert any(k.endswith("grid.png") for k in keys)
    assert not hasattr(comps.vae, "__dict__") or "decode" not in vars(comps.vae)  # unwrapped


@pytest.mark.parametrize("kind", ["SD_TEXTUAL_INVERSION", "SDXL_LORA_AND_TEXTUAL_INVERSION"])
def test_ema_updates_for_textual_inversion_types(
    kind: str, request: pytest.FixtureRequest, data_dir: Path, tmp_path: Path
) -> None:
    """``after_optimizer_step`` of the TI types moves the EMA too (it normalised the vectors
    without calling the base hook, so ``ema_decay`` did nothing there)."""
    model = model_for(kind, request)
    cfg = make_config(kind, model, data_dir, tmp_path, ema_decay=0.5)
    _, pipe = load_pipeline(cfg)
    assert pipe.ema is not None
    before = {k: v.clone() for k, v in pipe.ema.shadow.items()}
    with torch.no_grad():
        for param in pipe.trainable_parameters().values():
            param.add_(1.0)  # as an optimizer step would move them
    pipe.after_optimizer_step()
    for name, param in pipe.trainable_parameters().items():
        expected = torch.lerp(before[name], param.detach().float(), 0.5)
        assert torch.allclose(pipe.ema.shadow[name], expected), name
    assert any(n.startswith("ti.") for n in pipe.ema.shadow)


def _fp16_accelerator() -> Any:
    """An fp16 ``Accelerator`` as accelerate builds it on CUDA (fp16 autocast + GradScaler).
    accelerate refuses that pair on CPU (it leaves autocast off and no scaler), though torch
    has both for CPU, so the two attributes are set here: a fake of that one refusal only."""
    from accelerate import Accelerator

    reset_accelerate()
    accelerator = Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    return accelerator


def _runner(cfg: Any, accelerator: Any) -> tuple[Any, Any]:
    from runner.training.loop import StepRunner
    from runner.training.optim import build_lr_scheduler, build_optimizer

    _, pipe = load_pipeline(cfg)
    optimizer = build_optimizer(cfg.optimizer, pipe.param_groups(), CPU)
    schedule = build_lr_scheduler("linear", optimizer, warmup_steps=0, total_steps=10)
    optimizer = accelerator.prepare(optimizer)
    pipe.set_train(True)
    gen = torch.Generator().manual_seed(0)
    return pipe, StepRunner(accelerator, pipe, optimizer, schedule, gen, max_grad_norm=1.0)


def _poison_once(params: list[torch.nn.Parameter]) -> Callable[[], None]:
    """Make the next backward's gradient of ``params[0]`` infinite; returns the remover."""
    handle = params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    return handle.remove


def test_fp16_step_with_overflowing_gradients_is_skipped_and_the_scale_drops(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, mixed_precision="fp16",
                      weight_dtype="float32", ema_decay=0.9)  # fmt: skip
    accelerator = _fp16_accelerator()
    pipe, runner = _runner(cfg, accelerator)
    params = list(pipe.trainable_parameters().values())
    watched = {"unet": pipe.comps.unet.conv_in, "vae": pipe.comps.vae.encoder.conv_in}
    before = [p.detach().clone() for p in params]
    scale, lr = accelerator.scaler.get_scale(), runner.lr
    remove = _poison_once(params)
    with dtypes_of(watched) as seen:
        loss = runner.run([_batch()], 0)
    remove()
    assert seen == {"unet": {torch.float16}, "vae": {torch.float32}}  # fp16 autocast was on
    assert torch.isfinite(loss)
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))  # skipped
    assert accelerator.scaler.get_scale() == scale / 2
    assert runner.lr == lr  # the LR schedule does not advance over a skipped step
    runner.run([_batch()], 1)
    assert not all(torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert accelerator.scaler.get_scale() == scale / 2 and runner.lr < lr
    reset_accelerate()


def test_a_ti_text_encoder_keeps_its_weight_dtype() -> None:
    """transformers' `encoder.dtype` is its first floating parameter; the trainable float32
    TI vectors came first, so a bfloat16 encoder read float32, the pipelines cast prompts and
    latents to float32, and validation of invoke-training's own TI samples (weight_dtype:
    bfloat16, mixed_precision: no) died with 'mat1 and mat2 must have the same dtype'."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from runner.pipelines.textual_inversion import TrainableTokenEmbedding

    config = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                            num_hidden_layers=1, num_attention_heads=4)  # fmt: skip
    encoder = CLIPTextModel(config).to(torch.bfloat16)
    base = encoder.get_input_embeddings()
    wrapper = TrainableTokenEmbedding(base, 97, base.weight[:2].float())
    encoder.set_input_embeddings(wrapper)
    assert encoder.dtype == torch.bfloat16
    assert wrapper.vectors.dtype == torch.float32 and wrapper.vectors.requires_grad
    out = encoder(torch.tensor([[1, 97, 98]])).last_hidden_state
    assert out.dtype == torch.bfloat16


@pytest.mark.slow
def test_bfloat16_textual_inversion_validates(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The whole run: SD_TEXTUAL_INVERSION in bfloat16 weights without autocast trains and
    writes its validation grid (it raised at the first validation)."""
    from train_support import train

    cfg = make_config("SD_TEXTUAL_INVERSION", tiny_sd_dir, data_dir, tmp_path / "out",
                      weight_dtype="bfloat16", max_train_steps=2, validate_every_n_steps=2,
                      validation_prompts=["a photo of <kbtn>"],
                      num_validation_inference_steps=2)  # fmt: skip
    train(cfg)
    assert (tmp_path / "out" / "validation" / "step-000002" / "grid.png").is_file()
