"""FLUX_LORA on builtin-style tiny FLUX (CPU, offline): it trains, checkpoints, validates and
resumes exactly after SIGTERM; its outputs load where people load FLUX LoRAs and give the
model training ended with: diffusers' ``FluxPipeline.load_lora_weights`` (invoke_peft and
kohya files) and ComfyUI's key names and merge rule for kohya files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from safetensors.torch import load_file
from train_support import (
    checkpoint_weights,
    load_pipeline,
    make_config,
    step_dirs,
    stopped_and_resumed,
    train,
    training_images,
)

from kubetune.errors import ResumeMismatchError
from runner.models.flux_keys import bfl_to_diffusers, diffusers_to_bfl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CPU = torch.device("cpu")
pytest_plugins = ["fixtures_models"]  # tiny_flux_dir
# Modules of double blocks only: diffusers' kohya FLUX reader splits single-block linear1 at
# FLUX.1's fixed 3072/12288 sizes, which the tiny model does not have.
DOUBLE_ONLY = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_out.0"]
# ComfyUI's LORA_CLIP_MAP (comfy/lora.py): CLIP layer module -> kohya name part.
COMFY_CLIP = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


data_dir = training_images(n=4)


def _image(pipe: FluxPipeline) -> np.ndarray:
    out = pipe("a kbtn picture", num_inference_steps=2, height=64, width=64,
               generator=torch.Generator().manual_seed(0), max_sequence_length=16)  # fmt: skip
    return np.asarray(out.images[0]).astype(np.int16)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["kohya", "invoke_peft"])
def test_flux_lora_trains_validates_and_loads_into_diffusers(
    fmt: str, tiny_flux_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    extra: dict[str, Any] = {"lora_checkpoint_format": fmt, "train_text_encoder": True}
    if fmt == "kohya":
        extra["flux_lora_target_modules"] = DOUBLE_ONLY
    extra.update(
        validation_prompts=["a kbtn picture"],
        validate_every_n_steps=4,
        num_validation_images_per_prompt=2,
        max_checkpoints=2,
        optimizer={"optimizer_type": "AdamW", "learning_rate": 5e-2},
    )
    cfg = make_config("FLUX_LORA", tiny_flux_dir, data_dir, out, max_train_steps=6, **extra)
    assert train(cfg).step == 6
    assert step_dirs(out) == ["step-000004", "step-000006"]  # step 2 pruned (max 2)
    pngs = sorted(p.name for p in (out / "validation" / "step-000004").iterdir())
    assert pngs == ["grid.png", "prompt-0-0.png", "prompt-0-1.png", "thumb-0.jpg"]
    assert json.loads((out / "progress.json").read_text())["state"] == "completed"
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    final = out / "final"
    if fmt == "kohya":
        keys = load_file(final / "lora.safetensors")
        assert any(k.startswith("lora_unet_double_blocks_0_txt_attn_qkv") for k in keys)
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in keys)
        pipe.load_lora_weights(final, weight_name="lora.safetensors")
    else:
        assert (final / "transformer" / "adapter_config.json").exists()
        assert (final / "text_encoder_1" / "adapter_config.json").exists()
        pipe.load_lora_weights(final)
    assert np.abs(_image(pipe) - before).max() > 0, "the LoRA did not change the output"


# --- the exported files reproduce the trained model --------------------------------------


def _trained(tiny_flux_dir: Path, tmp_path: Path, **fields: Any) -> Any:
    """A FLUX_LORA pipeline whose LoRA weights are all random (as after training)."""
    cfg = make_config("FLUX_LORA", tiny_flux_dir, tmp_path, tmp_path / "o",
                      train_text_encoder=True, lora_rank_dim=2, **fields)  # fmt: skip
    _, pipeline = load_pipeline(cfg)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in pipeline.trainable_parameters().values():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return pipeline


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, 16, 64, generator=g),
        "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.4]),
        "guidance": torch.tensor([3.5]),
        "txt_ids": torch.zeros(8, 3),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32),
    }


@torch.no_grad()
def _outputs(transformer: Any, clip: Any) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407]])
    return transformer(**_inputs(), return_dict=False)[0], clip(ids).pooler_output


def test_invoke_peft_output_loads_in_diffusers_as_trained(
    tiny_flux_dir: Path, tmp_path: Path
) -> None:
    pipeline = _trained(tiny_flux_dir, tmp_path)
    want = _outputs(pipeline.comps.transformer, pipeline.comps.text_encoder)
    pipeline.flux.lora_checkpoint_format = "invoke_peft"
    pipeline.export(tmp_path / "peft")
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    before = _outputs(pipe.transformer, pipe.text_encoder)
    pipe.load_lora_weights(tmp_path / "peft")
    got = _outputs(pipe.transformer, pipe.text_encoder)
    for g, w, b in zip(got, want, before, strict=True):
        assert not torch.allclose(b, w, atol=1e-4)
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_kohya_output_loads_in_diffusers_as_trained(tiny_flux_dir: Path, tmp_path: Path) -> None:
    pipeline = _trained(tiny_flux_dir, tmp_path, flux_lora_target_modules=DOUBLE_ONLY)
    want = _outputs(pipeline.comps.transformer, pipeline.comps.text_encoder)
    pipeline.export(tmp_path / "kohya")
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.load_lora_weights(tmp_path / "kohya", weight_name="lora.safetensors")
    for g, w in zip(_outputs(pipe.transformer, pipe.text_encoder), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _comfy_merge(weights_by_key: dict[str, torch.Tensor], lora: dict[str, torch.Tensor],
                 key_map: dict[str, str]) -> set[str]:  # fmt: skip
    """ComfyUI's rule (comfy/lora.py, calculate_weight): W += up @ down * alpha / rank, the
    LoRA name looked up in the model's key map. Returns the LoRA names it found."""
    names = {k.rsplit(".", 2)[0] for k in lora if k.endswith(".lora_down.weight")}
    for name in names:
        target = key_map[name]  # a KeyError here is a key ComfyUI would not load
        down, up = lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"]
        scale = lora[f"{name}.alpha"].item() / down.shape[0]
        weights_by_key[target] = weights_by_key[target] + (up @ down) * scale
    return names


# Every other kind of module: embedders, modulation, the swapped final norm, a partly fused
# q/k/v (q only: zero blocks for k and v), the guidance MLP.
EDGE_TARGETS = ["x_embedder", "context_embedder", "norm1.linear", "norm.linear", "norm_out.linear",
                "to_q", "timestep_embedder.linear_1", "guidance_embedder.linear_2"]  # fmt: skip


@pytest.mark.parametrize("targets", [None, EDGE_TARGETS], ids=["default", "edge"])
def test_kohya_keys_and_merge_are_what_comfyui_expects(
    targets: list[str] | None, tiny_flux_dir: Path, tmp_path: Path
) -> None:
    """ComfyUI is not installed here: its key maps and merge rule are re-implemented from
    comfy/lora.py (model_lora_keys_unet: ``lora_unet_`` + the BFL key with dots as
    underscores; model_lora_keys_clip: ``lora_te1_text_model_encoder_layers_{b}_{part}``)
    and applied to the BFL weights, which diffusers-side conversion then loads."""
    extra = {} if targets is None else {"flux_lora_target_modules": targets}
    pipeline = _trained(tiny_flux_dir, tmp_path, **extra)
    want = _outputs(pipeline.comps.transformer, pipeline.comps.text_encoder)
    pipeline.export(tmp_path / "kohya")
    lora = load_file(tmp_path / "kohya" / "lora.safetensors")
    base = FluxPipeline.from_pretrained(tiny_flux_dir)
    bfl = diffusers_to_bfl(base.transformer.state_dict())
    unet_map = {f"lora_unet_{k[: -len('.weight')].replace('.', '_')}": k for k in bfl}
    found = _comfy_merge(bfl, {k: v for k, v in lora.items() if "lora_unet_" in k}, unet_map)
    assert {n.split("_blocks_")[0] for n in found} >= {"lora_unet_double", "lora_unet_single"}
    if targets is not None:
        assert {"lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in"} <= found
    merged = FluxTransformer2DModel.from_config(base.transformer.config)
    merged.load_state_dict(bfl_to_diffusers(bfl))
    clip_state = base.text_encoder.state_dict()
    # ComfyUI's clip_l keys are transformers 4's (text_model.encoder...); transformers 5
    # dropped the text_model level, so map onto whichever this model has.
    level = "text_model." if any(k.startswith("text_model.") for k in clip_state) else ""
    clip_map = {
        f"lora_te1_text_model_encoder_layers_{b}_{part}": f"{level}encoder.layers.{b}.{c}.weight"
        for b in range(5)
        for c, part in COMFY_CLIP.items()
    }
    _comfy_merge(clip_state, {k: v for k, v in lora.items() if "lora_te1_" in k}, clip_map)
    base.text_encoder.load_state_dict(clip_state)
    assert set(lora) == {k for k in lora if k.startswith(("lora_unet_", "lora_te1_"))}
    for g, w in zip(_outputs(merged, base.text_encoder), want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


# --- exact resume, caches, masks -----------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(
    tiny_flux_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    fields = {"train_text_encoder": True, "timestep_sampler": "shift"}
    reference, out = stopped_and_resumed("FLUX_LORA", tiny_flux_dir, data_dir, tmp_path, **fields)
    expected, got = checkpoint_weights(reference, 6), checkpoint_weights(out, 6)
    assert expected.keys() == got.keys() and any("transformer" in k for k in got)
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit for bit


@pytest.mark.slow
def test_cached_encoders_match_uncached(
    tiny_flux_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    common = dict(max_train_steps=None, max_train_epochs=2, save_every_n_steps=None,
                  save_every_n_epochs=2, timestep_sampler="uniform")  # fmt: skip
    plain = make_config("FLUX_LORA", tiny_flux_dir, data_dir, tmp_path / "plain", **common)
    caches = dict(cache_vae_outputs=True, cache_text_encoder_outputs=True)
    cached = make_config(
        "FLUX_LORA", tiny_flux_dir, data_dir, tmp_path / "cached", **caches, **common
    )
    assert train(plain).step == train(cached).step == 4
    expected, got = (
        checkpoint_weights(tmp_path / "plain", 4),
        checkpoint_weights(tmp_path / "cached", 4),
    )
    for key in expected:  # batched vs per-example encoding: last-bit differences only
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4)


def test_zero_mask_gives_zero_loss_and_t5_stays_in_eval(
    tiny_flux_dir: Path, tmp_path: Path
) -> None:
    cfg = make_config("FLUX_LORA", tiny_flux_dir, tmp_path, tmp_path / "o",
                      gradient_checkpointing=True, train_text_encoder=True)  # fmt: skip
    _, pipeline = load_pipeline(cfg)
    pipeline.set_train(True)
    assert pipeline.comps.transformer.training and pipeline.comps.text_encoder.training
    assert not pipeline.comps.text_encoder_2.training  # T5 has dropout: never train mode
    batch = {"pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1, "caption": ["a", "b"],
             "id": ["x", "y"], "mask": torch.zeros(2, 1, 64, 64)}  # fmt: skip
    loss = pipeline.loss(batch, torch.Generator().manual_seed(0))
    assert loss.item() == 0.0
    batch["mask"] = torch.ones(2, 1, 64, 64)
    assert pipeline.loss(batch, torch.Generator().manual_seed(0)).item() > 0


@pytest.mark.parametrize("seed", [7, None])
def test_validation_images_are_the_ones_invoke_training_draws(
    seed: int | None, tiny_flux_dir: Path, tmp_path: Path
) -> None:
    """invoke-training's ``_shared/flux/validation.py`` written against diffusers: FluxPipeline
    over the training modules and scheduler, the pipeline's default guidance, one generator
    per prompt seeded with ``seed`` (unseeded when null) drawing that prompt's images in turn;
    kubetune passes T5's training length (``max_sequence_length``)."""
    from PIL import Image

    from kubetune.storage import open_store
    from runner.session.settings import validation_settings
    from runner.training.validation import Validator

    prompts = ["a kbtn picture", "a red circle"]
    cfg = make_config("FLUX_LORA", tiny_flux_dir, tmp_path, tmp_path / "o", seed=seed,
                      validation_prompts=prompts, num_validation_images_per_prompt=2,
                      validate_every_n_steps=1)  # fmt: skip
    comps, pipeline = load_pipeline(cfg)
    Validator(validation_settings(cfg), pipeline, open_store(str(tmp_path / "s")), CPU).validate(1)
    pipeline.set_train(False)
    reference = FluxPipeline(vae=comps.vae, text_encoder=comps.text_encoder,
                             text_encoder_2=comps.text_encoder_2, tokenizer=comps.tokenizer,
                             tokenizer_2=comps.tokenizer_2, transformer=comps.transformer,
                             scheduler=comps.noise_scheduler)  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(prompts):
        generator = torch.Generator(device=CPU)
        if seed is not None:
            generator = generator.manual_seed(seed)
        for j in range(2):
            want = reference(prompt, num_inference_steps=cfg.num_validation_inference_steps,
                             generator=generator, height=64, width=64,
                             max_sequence_length=cfg.t5_tokenizer_max_length).images[0]  # fmt: skip
            path = tmp_path / "s" / "validation" / "step-000001" / f"prompt-{i}-{j}.png"
            with Image.open(path) as got:
                same = np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
            assert same, (i, j)  # unseeded: torch.Generator's default seed, on both sides


def test_resume_under_other_flux_targets_is_refused(
    tiny_flux_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = dict(max_train_steps=2, save_every_n_steps=2)
    train(make_config("FLUX_LORA", tiny_flux_dir, data_dir, out, **base))
    changed = make_config("FLUX_LORA", tiny_flux_dir, data_dir, out,
                          flux_lora_target_modules=["to_q"], **base)  # fmt: skip
    with pytest.raises(ResumeMismatchError, match="flux_lora_target_modules"):
        train(changed)


def test_negative_prompts_act_through_true_cfg(tiny_flux_dir: Path, tmp_path: Path) -> None:
    """kubetune extension: with validation_true_cfg_scale > 1 the negative prompt changes
    the validation image (FluxPipeline's true classifier-free guidance)."""
    from PIL import Image

    from kubetune.storage import open_store
    from runner.session.settings import validation_settings
    from runner.training.validation import Validator

    images = []
    negative = {"negative_validation_prompts": ["blurry"], "validation_true_cfg_scale": 4.0}
    for name, extra in (("plain", {}), ("negative", negative)):
        cfg = make_config("FLUX_LORA", tiny_flux_dir, tmp_path, tmp_path / name,
                          validation_prompts=["a kbtn picture"], validate_every_n_steps=1,
                          num_validation_images_per_prompt=1, **extra)  # fmt: skip
        _, pipeline = load_pipeline(cfg)
        store = open_store(str(tmp_path / name))
        Validator(validation_settings(cfg), pipeline, store, CPU).validate(1)
        with Image.open(tmp_path / name / "validation/step-000001/prompt-0-0.png") as image:
            images.append(np.asarray(image.convert("RGB")).astype(np.int16))
    assert np.abs(images[0] - images[1]).max() > 0


def test_peft_configs_and_param_groups_are_invoke_trainings(
    tiny_flux_dir: Path, tmp_path: Path
) -> None:
    """invoke-training's FLUX train.py: ``LoraConfig(r=lora_rank_dim, lora_alpha=1.0,
    target_modules=...)`` on the transformer and (train_text_encoder) CLIP; param groups
    transformer first, then the text encoder, at their own learning rates."""
    import importlib.util

    tables = Path(__file__).parents[1] / "test_kubetune" / "test_parity_config.py"
    spec = importlib.util.spec_from_file_location("parity_tables", tables)
    assert spec is not None and spec.loader is not None
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)  # invoke-training's lists, read from its source
    FLUX_TARGETS, TE_TARGETS = parity.FLUX_TARGETS, parity.TE_TARGETS  # noqa: N806

    cfg = make_config("FLUX_LORA", tiny_flux_dir, tmp_path, tmp_path / "o",
                      train_text_encoder=True, transformer_learning_rate=4e-4,
                      text_encoder_learning_rate=1e-4)  # fmt: skip
    comps, pipeline = load_pipeline(cfg)
    for module, targets in ((comps.transformer, FLUX_TARGETS), (comps.text_encoder, TE_TARGETS)):
        peft = module.peft_config["default"]
        assert (peft.r, peft.lora_alpha, set(peft.target_modules)) == (4, 1.0, set(targets))
    groups = pipeline.param_groups()
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("transformer", 4e-4),
        ("text_encoder_1", 1e-4),
    ]
    lora = {n.rsplit(".lora_", 1)[0] for n in pipeline.trainable_parameters()}
    assert (
        "transformer.proj_out" in lora and "transformer.transformer_blocks.0.ff.net.2" not in lora
    )
    assert "transformer.single_transformer_blocks.0.proj_mlp" in lora
    assert not any(p.requires_grad for p in comps.text_encoder_2.parameters())  # T5 frozen


def test_a_transformer_without_guidance_embedding_trains(
    tiny_flux_dir: Path, tmp_path: Path
) -> None:
    """FLUX.1-schnell has no guidance embedding: no guidance is passed (invoke-training always
    passes one, which such a transformer cannot take)."""
    import shutil

    model = tmp_path / "schnell-like"
    shutil.copytree(tiny_flux_dir, model)
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config(
        {
            **FluxTransformer2DModel.load_config(tiny_flux_dir / "transformer"),
            "guidance_embeds": False,
        }
    ).save_pretrained(model / "transformer")
    cfg = make_config("FLUX_LORA", model, tmp_path, tmp_path / "o")
    _, pipeline = load_pipeline(cfg)
    assert not pipeline.comps.transformer.config.guidance_embeds
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "caption": ["a", "b"],
        "id": ["x", "y"],
    }
    loss = pipeline.loss(batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert loss.item() > 0
    assert any(p.grad is not None for p in pipeline.trainable_parameters().values())
