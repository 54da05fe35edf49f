"""Conformance with invoke-training, one test per type (issue #12): a config with the LoRA
fields left at their defaults builds the model invoke-training would build.

Expected values are invoke-training's published behaviour (its ``pipelines/*/train.py`` at
commit 99c673d), not kubetune's code:
- every LoRA is ``peft.LoraConfig(r=lora_rank_dim, lora_alpha=1.0, target_modules=...)`` with
  peft's default initialisation; UNet targets ``UNET_TARGET_MODULES``, text encoders
  ``TEXT_ENCODER_TARGET_MODULES`` (``_shared/stable_diffusion/lora_checkpoint_utils.py``);
- optimizer param groups, in order: unet, text encoder (SD) or text encoder 1, 2 (SDXL), then
  for LoRA+TI the TI embeddings of encoder 1, 2; a group without its own rate uses the
  optimizer's; LoRA+TI defaults 1e-4 (UNet), 1e-5 (text encoders), 1e-3 (TI);
  SD TI: one group; SDXL TI: one group per encoder;
- the kohya file: ``lora_unet_`` / ``lora_te_`` (SD) or ``lora_te1_`` / ``lora_te2_`` (SDXL)
  keys with ``lora_down`` / ``lora_up`` / ``alpha``, every ``.alpha`` 1.0; text-encoder keys
  carry ``text_model_encoder_layers_`` (its transformers 4 CLIP module paths).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from parity_reference import TE_TARGETS, UNET_TARGETS
from safetensors.torch import load_file
from train_support import load_pipeline, make_config, model_for, training_images

from kubetune.config import PipelineConfig, parse_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
CPU = torch.device("cpu")


data_dir = training_images(n=2)


def defaults_config(kind: str, model: Path, data: Path, out: Path, **fields: Any) -> PipelineConfig:
    """A test config with the optimizer and every LoRA / TI rate left at its default."""
    raw = make_config(kind, model, data, out).model_dump(mode="json", exclude_unset=True)
    for key in ("optimizer", "textual_inversion_learning_rate", "ti_train_steps_ratio"):
        raw.pop(key, None)
    raw.update(fields)
    return parse_config(yaml.safe_dump(raw))


def build(cfg: PipelineConfig) -> tuple[Any, Any, torch.optim.Optimizer]:
    from runner.training.optim import build_optimizer

    comps, pipe = load_pipeline(cfg, total_steps=10)
    return comps, pipe, build_optimizer(cfg.optimizer, pipe.param_groups(), CPU)


def groups(optimizer: torch.optim.Optimizer) -> list[tuple[str, float]]:
    return [(g["name"], g["lr"]) for g in optimizer.param_groups]


def lora_params(module: torch.nn.Module) -> set[int]:
    return {id(p) for n, p in module.named_parameters() if "lora_" in n}


def check_peft(module: torch.nn.Module, targets: list[str], wrapped: list[str]) -> None:
    config = module.peft_config["default"]
    assert config.r == 4
    assert config.lora_alpha == 1.0
    assert set(config.target_modules) == set(targets)
    assert config.init_lora_weights is True
    names = [n for n, m in module.named_modules() if hasattr(m, "lora_A")]
    for suffix in wrapped:  # a few of the modules only the full list reaches
        assert any(n.endswith(suffix) for n in names), f"no LoRA on *{suffix}"
    scalings = {m.scaling["default"] for m in module.modules() if hasattr(m, "scaling")}
    assert scalings == {0.25}  # alpha / rank = 1 / 4


UNET_WRAPPED = ["ff.net.2", "time_emb_proj", "resnets.0.conv1", "proj_in", "attn1.to_q"]
TE_WRAPPED = ["mlp.fc1", "mlp.fc2", "self_attn.q_proj"]


def check_kohya(path: Path, prefixes: set[str], modules: int) -> None:
    state = load_file(path)
    assert {k.split("_", 2)[0] + "_" + k.split("_", 2)[1] for k in state} == prefixes
    alphas = {k: v for k, v in state.items() if k.endswith(".alpha")}
    assert len(alphas) == modules
    assert all(float(v) == 1.0 for v in alphas.values())
    kinds = {k.split(".", 1)[1] for k in state if not k.endswith(".alpha")}
    assert kinds == {"lora_down.weight", "lora_up.weight"}
    assert any("_ff_net_2." in k for k in state) and any("_mlp_fc1." in k for k in state)
    te_keys = [k for k in state if k.startswith("lora_te")]
    assert te_keys and all("_text_model_encoder_layers_" in k for k in te_keys), te_keys[:2]


def wrapped_count(*modules: torch.nn.Module) -> int:
    return sum(1 for m in modules for sub in m.modules() if hasattr(sub, "lora_A"))


def test_sd_lora_conforms(tiny_sd_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = defaults_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path)
    comps, pipe, optimizer = build(cfg)
    check_peft(comps.unet, UNET_TARGETS, UNET_WRAPPED)
    check_peft(comps.text_encoder, TE_TARGETS, TE_WRAPPED)
    assert groups(optimizer) == [("unet", 1e-4), ("text_encoder", 1e-4)]
    unet_group, te_group = optimizer.param_groups
    assert {id(p) for p in unet_group["params"]} == lora_params(comps.unet)
    assert {id(p) for p in te_group["params"]} == lora_params(comps.text_encoder)
    (path,) = pipe.export(tmp_path / "final")
    check_kohya(path, {"lora_unet", "lora_te"}, wrapped_count(comps.unet, comps.text_encoder))
    check_diffusers_loads_text_encoder_lora(tiny_sd_dir, path)


def check_diffusers_loads_text_encoder_lora(model: Path, path: Path) -> None:
    """The ``text_model_`` keys still reach a transformers 5 text encoder through diffusers."""
    from diffusers import StableDiffusionPipeline

    target = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    target.load_lora_weights(path.parent, weight_name=path.name)
    loaded = [n for n, _ in target.text_encoder.named_parameters() if "lora_A" in n]
    assert any("mlp.fc1" in n for n in loaded) and any("self_attn.q_proj" in n for n in loaded)


def test_sdxl_lora_conforms(tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    cfg = defaults_config(
        "SDXL_LORA", tiny_sdxl_dir, data_dir, tmp_path, text_encoder_learning_rate=3e-5
    )
    comps, pipe, optimizer = build(cfg)
    check_peft(comps.unet, UNET_TARGETS, UNET_WRAPPED)
    for encoder in comps.text_encoders:
        check_peft(encoder, TE_TARGETS, TE_WRAPPED)
    assert groups(optimizer) == [
        ("unet", 1e-4),
        ("text_encoder_1", 3e-5),
        ("text_encoder_2", 3e-5),
    ]
    (path,) = pipe.export(tmp_path / "final")
    check_kohya(
        path,
        {"lora_unet", "lora_te1", "lora_te2"},
        wrapped_count(comps.unet, *comps.text_encoders),
    )


def test_sdxl_lora_and_ti_conforms(tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    kind = "SDXL_LORA_AND_TEXTUAL_INVERSION"
    cfg = defaults_config(
        kind,
        tiny_sdxl_dir,
        data_dir,
        tmp_path,
        optimizer={"optimizer_type": "AdamW", "learning_rate": 2e-3},  # the gnome sample's
    )
    comps, pipe, optimizer = build(cfg)
    check_peft(comps.unet, UNET_TARGETS, UNET_WRAPPED)
    for encoder in comps.text_encoders:
        check_peft(encoder, TE_TARGETS, TE_WRAPPED)
    assert groups(optimizer) == [
        ("unet", 1e-4),
        ("text_encoder_1", 1e-5),
        ("text_encoder_2", 1e-5),
        ("ti_embeddings_1", 1e-3),
        ("ti_embeddings_2", 1e-3),
    ]
    for group, encoder in zip(optimizer.param_groups[3:], comps.text_encoders, strict=True):
        (vectors,) = group["params"]
        width = encoder.get_input_embeddings().weight.shape[1]
        assert tuple(vectors.shape) == (cfg.num_vectors, width)
    lora_path = next(p for p in pipe.export(tmp_path / "final") if p.name == "lora.safetensors")
    check_kohya(
        lora_path,
        {"lora_unet", "lora_te1", "lora_te2"},
        wrapped_count(comps.unet, *comps.text_encoders),
    )


@pytest.mark.parametrize("kind", ["SD_TEXTUAL_INVERSION", "SDXL_TEXTUAL_INVERSION"])
def test_textual_inversion_conforms(
    kind: str, request: pytest.FixtureRequest, data_dir: Path, tmp_path: Path
) -> None:
    model = model_for(kind, request)
    cfg = defaults_config(kind, model, data_dir, tmp_path)
    comps, _, optimizer = build(cfg)
    expected = (
        [("ti_embeddings_1", 1e-4), ("ti_embeddings_2", 1e-4)]
        if "SDXL" in kind
        else [("ti_embeddings", 1e-4)]
    )
    assert groups(optimizer) == expected
    for group, encoder in zip(optimizer.param_groups, comps.text_encoders, strict=True):
        (vectors,) = group["params"]  # only the new vectors train
        width = encoder.get_input_embeddings().weight.shape[1]
        assert tuple(vectors.shape) == (cfg.num_vectors, width)
    assert not any("lora_" in n for n, _ in comps.unet.named_parameters())
