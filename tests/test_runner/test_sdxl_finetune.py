"""SDXL_FINETUNE end to end on the tiny SDXL (CPU, offline): the full UNet trains, each
``save_checkpoint_format`` writes what diffusers loads (``UNet2DConditionModel`` /
``StableDiffusionXLPipeline``) and the trained UNet changes the pipeline's output; the
checkpoint keeps the exact trained weights in their training dtype; an SD 1.x base model is
refused before training."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from train_support import (
    checkpoint_weights,
    load_pipeline,
    make_config,
    sample_latents,
    step_dirs,
    stopped_and_resumed,
    train,
    training_images,
)

from kubetune.errors import UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]  # tiny_sd_dir / tiny_sdxl_dir
KIND = "SDXL_FINETUNE"


data_dir = training_images(n=4)


@pytest.mark.slow
def test_trained_only_unet_loads_in_diffusers_and_changes_the_output(
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    out = tmp_path / "run"
    cfg = make_config(KIND, tiny_sdxl_dir, data_dir, out, max_checkpoints=1,
                      validation_prompts=["a kbtn picture"], validate_every_n_steps=4,
                      num_validation_images_per_prompt=1)  # fmt: skip
    assert train(cfg).step == 4
    assert step_dirs(out) == ["step-000004"]  # step 2 pruned (max_checkpoints 1)
    assert (out / "validation" / "step-000004" / "grid.png").exists()
    final = out / "final"
    assert sorted(p.name for p in (final / "unet").iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    stored = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}  # save_dtype's default
    unet = UNet2DConditionModel.from_pretrained(final, subfolder="unet", dtype=torch.float16)
    trained = checkpoint_weights(out, 4)
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    changed = 0
    for name, param in unet.named_parameters():
        exact = trained[f"unet.{name}"]
        assert exact.dtype == torch.float32  # weight_dtype float32, no mixed precision
        assert torch.equal(param, exact.half()), name  # the export is the trained weights
        changed += not torch.equal(exact, base.get_parameter(name).float())
    assert changed > 0.9 * len(trained), "the full UNet should train, not a few tensors"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    before = sample_latents(pipe)
    pipe.unet = unet.float()
    assert not torch.allclose(before, sample_latents(pipe)), "the trained UNet changed nothing"
    manifest = json.loads((final / "manifest.json").read_text())
    assert sorted(manifest["meta"]["weights"]) == [
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]


@pytest.mark.slow
def test_full_diffusers_checkpoint_is_a_whole_pipeline(
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    cfg = make_config(KIND, tiny_sdxl_dir, data_dir, out, max_train_steps=2,
                      save_checkpoint_format="full_diffusers", save_dtype="bfloat16")  # fmt: skip
    train(cfg)
    folder = out / "checkpoints" / "step-000002"
    expected = {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2",
                "tokenizer", "tokenizer_2", "scheduler"}  # fmt: skip
    assert expected <= {p.name for p in folder.iterdir()}
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder_2/model.safetensors"):
        assert {t.dtype for t in load_file(folder / part).values()} == {torch.bfloat16}, part
    loaded = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    trained = checkpoint_weights(out, 2)
    for name, param in loaded.unet.named_parameters():
        assert torch.equal(param, trained[f"unet.{name}"].bfloat16()), name
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    for name, param in loaded.text_encoder_2.named_parameters():  # frozen: unchanged
        assert torch.equal(param, base.text_encoder_2.get_parameter(name).bfloat16()), name
    base_latents = sample_latents(base)
    mixed = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    mixed.unet = loaded.unet.float()
    assert not torch.allclose(base_latents, sample_latents(mixed))


def test_bf16_training_checkpoints_bf16_weights_exactly(
    tiny_sdxl_dir: Path, data_dir: Path
) -> None:
    """invoke-training trains the UNet in weight_dtype without mixed precision (what fits a
    24 GB GPU); the checkpoint keeps those weights as they are, not widened to float32."""
    cfg = make_config(KIND, tiny_sdxl_dir, data_dir, Path("unused"), weight_dtype="bfloat16")
    comps, pipe = load_pipeline(cfg)
    assert comps.unet.dtype == torch.bfloat16
    assert all(p.requires_grad for p in comps.unet.parameters())
    assert not any(p.requires_grad for m in comps.text_encoders for p in m.parameters())
    assert [g["name"] for g in pipe.param_groups()] == ["unet"]
    mixed = make_config(KIND, tiny_sdxl_dir, data_dir, Path("unused"), weight_dtype="bfloat16",
                        mixed_precision="bf16")  # fmt: skip
    assert load_pipeline(mixed)[0].unet.dtype == torch.float32  # trainable params in fp32


def test_an_sd15_base_model_is_refused(tiny_sd_dir: Path, data_dir: Path) -> None:
    cfg = make_config(KIND, tiny_sd_dir, data_dir, Path("unused"))
    with pytest.raises(UserError, match="SDXL_FINETUNE needs an SDXL base model"):
        load_pipeline(cfg)


@pytest.mark.slow
def test_sigterm_resume_is_bitwise_equal_to_an_uninterrupted_run(
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """SIGTERM mid-run, restart: the final UNet, its EMA and the optimizer state equal an
    uninterrupted run's bit for bit (gradient accumulation, warm-up + cosine, clipping, EMA,
    cached text embeddings all on)."""
    reference, out = stopped_and_resumed(KIND, tiny_sdxl_dir, data_dir, tmp_path, ema_decay=0.9,
                                         cache_text_encoder_outputs=True)  # fmt: skip
    restore = tmp_path / "work-run" / "restore"
    assert not [p for p in restore.rglob("*") if p.is_file()]  # deleted once loaded
    expected, got = checkpoint_weights(reference, 6), checkpoint_weights(out, 6)
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    states = [
        torch.load(o / "checkpoints" / "step-000006" / "training_state.pt", weights_only=True)
        for o in (reference, out)
    ]
    for name in ("optimizer", "ema"):
        flat_ref, flat_got = _flat(states[0][name]), _flat(states[1][name])
        assert flat_ref.keys() == flat_got.keys() and flat_ref, name
        assert all(torch.equal(flat_got[k], flat_ref[k]) for k in flat_ref), name


def _flat(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested state dict, by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if not isinstance(state, (dict, list, tuple)):
        return {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


@pytest.mark.parametrize(
    ("weight_dtype", "mixed", "trained"),
    [("bfloat16", "no", torch.bfloat16), ("bfloat16", "bf16", torch.float32)],
)
@pytest.mark.slow
def test_sample_precisions_train_and_checkpoint_in_the_training_dtype(
    weight_dtype: str, mixed: str, trained: torch.dtype,
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path,
) -> None:  # fmt: skip
    """The samples' bf16 weights without mixed precision (and bf16 autocast over a float32
    UNet) train on the CPU; the checkpoint keeps the UNet in that dtype, the export in
    save_dtype, and the trained weights moved. In pure bf16 an update under half a bf16 ulp
    is lost (norm weights near 1.0 stay put: 361 of 428 tensors moved here), as in
    invoke-training; hence the looser bound."""
    out = tmp_path / "run"
    cfg = make_config(KIND, tiny_sdxl_dir, data_dir, out, max_train_steps=2,
                      weight_dtype=weight_dtype, mixed_precision=mixed)  # fmt: skip
    train(cfg)
    exact = checkpoint_weights(out, 2)
    assert {t.dtype for t in exact.values()} == {trained}
    stored = load_file(out / "final" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    base = load_file(tiny_sdxl_dir / "unet" / "diffusion_pytorch_model.safetensors")
    moved = sum(not torch.equal(exact[f"unet.{k}"].float(), v.float()) for k, v in base.items())
    assert moved > 0.75 * len(base)


@pytest.mark.slow
def test_the_gpu_fit_parameter_counts_are_sdxl_bases() -> None:
    """`launcher validate`'s memory estimate (kubetune.config.gpu_fit, torch-free) uses
    SDXL base 1.0's parameter counts: built here on the meta device from its configs."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from kubetune.config.gpu_fit import SDXL_TEXT_ENCODERS, SDXL_UNET, SDXL_VAE

    with init_empty_weights():
        unet = UNet2DConditionModel(
            sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )  # fmt: skip
        clip_l = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
            )
        )
        clip_g = CLIPTextModelWithProjection(
            CLIPTextConfig(
                hidden_size=1280,
                intermediate_size=5120,
                num_hidden_layers=32,
                num_attention_heads=20,
                projection_dim=1280,
            )
        )
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        )  # fmt: skip

    def count(*modules: torch.nn.Module) -> float:
        return sum(p.numel() for m in modules for p in m.parameters())

    assert count(unet) == pytest.approx(SDXL_UNET, rel=1e-3)
    assert count(clip_l, clip_g) == pytest.approx(SDXL_TEXT_ENCODERS, rel=1e-3)
    assert count(vae) == pytest.approx(SDXL_VAE, rel=1e-2)


def test_resume_refuses_another_optimizer_state_layout(tiny_sdxl_dir: Path, data_dir: Path) -> None:
    """8-bit AdamW's state (what invoke-training's samples use) cannot load into AdamW or
    Prodigy: switching between checkpoint and resume is refused up front, naming it;
    a checkpoint written before the field existed is not compared on it."""
    from kubetune.errors import ResumeMismatchError
    from runner.checkpoint.state import check_compatible
    from runner.session.settings import compat_info

    def info(**optimizer: Any) -> dict[str, Any]:
        opt = {"optimizer_type": "AdamW", "learning_rate": 1e-3, **optimizer}
        return compat_info(make_config(KIND, tiny_sdxl_dir, data_dir, Path("o"), optimizer=opt))

    saved = info(use_8bit=True)
    assert saved["optimizer"] == "AdamW-8bit"
    check_compatible(saved, info(use_8bit=True, learning_rate=2e-5), 2)  # a rate may change
    with pytest.raises(ResumeMismatchError, match="optimizer: checkpoint 'AdamW-8bit'"):
        check_compatible(saved, info(), 2)
    older = {k: v for k, v in saved.items() if k != "optimizer"}
    check_compatible(older, info(), 2)
