"""invoke-training parity of the schema (issue #12, #25): every invoke-training field of the
types kubetune trains exists here with invoke-training's default; every other field says "kubetune
extension"; invoke-training's own sample configs validate unchanged; the values
invoke-training accepts are accepted.

The tables below are invoke-training's published fields and defaults, read from its source
(``config/base_pipeline_config.py`` and ``pipelines/*/config.py`` at commit 99c673d), not
from kubetune's code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from parity_reference import TE_TARGETS, UNET_TARGETS

from kubetune.config import PIPELINE_CLASSES, parse_config
from kubetune.errors import ConfigError
from launcher.config_files import validate_file

SAMPLES = sorted((Path(__file__).parents[1] / "data" / "invoke_training_samples").glob("*.yaml"))
REQUIRED = object()
ADAMW = {
    "optimizer_type": "AdamW",
    "learning_rate": 1e-4,
    "beta1": 0.9,
    "beta2": 0.999,
    "weight_decay": 1e-2,
    "epsilon": 1e-8,
    "use_8bit": False,
}
COMMON: dict[str, Any] = {
    "seed": None,
    "base_output_dir": REQUIRED,
    "report_to": "tensorboard",
    "max_train_steps": None,
    "max_train_epochs": None,
    "save_every_n_epochs": None,
    "save_every_n_steps": None,
    "validate_every_n_epochs": None,
    "validate_every_n_steps": None,
    "hf_variant": "fp16",
    "optimizer": ADAMW,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "min_snr_gamma": 5.0,
    "cache_vae_outputs": False,
    "enable_cpu_offload_during_validation": False,
    "gradient_accumulation_steps": 1,
    "weight_dtype": "bfloat16",
    "mixed_precision": "no",
    "xformers": False,
    "gradient_checkpointing": False,
    "max_checkpoints": None,
    "prediction_type": None,
    "max_grad_norm": None,
    "validation_prompts": [],
    "negative_validation_prompts": None,
    "num_validation_images_per_prompt": 4,
    "train_batch_size": 4,
    "use_masks": False,
    "data_loader": REQUIRED,
}
LORA: dict[str, Any] = {
    "lora_checkpoint_format": "kohya",
    "train_unet": True,
    "train_text_encoder": True,
    "text_encoder_learning_rate": None,
    "unet_learning_rate": None,
    "lora_rank_dim": 4,
    "unet_lora_target_modules": UNET_TARGETS,
    "text_encoder_lora_target_modules": TE_TARGETS,
    "cache_text_encoder_outputs": False,
    "base_embeddings": {},
}
TI: dict[str, Any] = {
    "num_vectors": 1,
    "placeholder_token": REQUIRED,
    "initializer_token": None,
    "initial_embedding_file": None,
    "initial_phrase": None,
}
SDXL = "stabilityai/stable-diffusion-xl-base-1.0"
INVOKE_FIELDS: dict[str, dict[str, Any]] = {
    "SD_LORA": {**COMMON, **LORA, "model": "runwayml/stable-diffusion-v1-5"},
    "SDXL_LORA": {**COMMON, **LORA, "model": SDXL, "vae_model": None},
    # invoke-training has no default model for SD TI: any default accepts its configs.
    "SD_TEXTUAL_INVERSION": {**COMMON, **TI, "model": REQUIRED},
    "SDXL_TEXTUAL_INVERSION": {**COMMON, **TI, "model": SDXL, "vae_model": None},
    "SDXL_LORA_AND_TEXTUAL_INVERSION": {
        **COMMON,
        "model": SDXL,
        "vae_model": None,
        "lora_checkpoint_format": "kohya",
        "num_vectors": 1,
        "placeholder_token": REQUIRED,
        "initializer_token": None,
        "initial_phrase": None,
        "train_unet": True,
        "train_text_encoder": True,
        "train_ti": True,
        "ti_train_steps_ratio": None,
        "text_encoder_learning_rate": 1e-5,
        "unet_learning_rate": 1e-4,
        "textual_inversion_learning_rate": 1e-3,
        "lora_rank_dim": 4,
        "cache_text_encoder_outputs": False,
    },
    # pipelines/stable_diffusion_xl/finetune/config.py
    "SDXL_FINETUNE": {
        **COMMON,
        "model": SDXL,
        "vae_model": None,
        "save_checkpoint_format": "trained_only_diffusers",
        "save_dtype": "float16",
        "cache_text_encoder_outputs": False,
    },
}
FLUX_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "ff.net.0.proj",
    "ff.net.2.0",
    "ff_context.net.0.proj",
    "ff_context.net.2.0",
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "proj_mlp",
    "proj_out",
    "proj_in",
]
# pipelines/flux/lora/config.py (FluxLoraConfig) at commit 99c673d.
INVOKE_FIELDS["FLUX_LORA"] = {
    **{k: COMMON[k] for k in ("seed", "base_output_dir", "report_to")},
    **{k: COMMON[k] for k in COMMON if k.startswith(("max_train_", "save_every_", "validate_"))},
    "model": "black-forest-labs/FLUX.1-dev",
    "transformer_path": None,
    "text_encoder_1_path": None,
    "text_encoder_2_path": None,
    "lora_checkpoint_format": "kohya",
    "train_transformer": True,
    "train_text_encoder": False,
    "optimizer": ADAMW,
    "text_encoder_learning_rate": 1e-4,
    "transformer_learning_rate": 4e-4,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 10,
    "min_snr_gamma": None,
    "lora_rank_dim": 4,
    "flux_lora_target_modules": FLUX_TARGETS,
    "text_encoder_lora_target_modules": TE_TARGETS,
    "cache_text_encoder_outputs": False,
    "cache_vae_outputs": False,
    "enable_cpu_offload_during_validation": False,
    "gradient_accumulation_steps": 1,
    "weight_dtype": "float16",
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "max_checkpoints": None,
    "prediction_type": None,
    "max_grad_norm": None,
    "validation_prompts": [],
    "num_validation_images_per_prompt": 4,
    "train_batch_size": 1,
    "use_masks": False,
    "data_loader": REQUIRED,
    "timestep_sampler": "shift",
    "discrete_flow_shift": 3.0,
    "sigmoid_scale": 1.0,
    "lora_scale": 1.0,
    "guidance_scale": 1.0,
    "clip_tokenizer_max_length": 77,
    "t5_tokenizer_max_length": 512,
}
CLASSES = {cls.model_fields["type"].default: cls for cls in PIPELINE_CLASSES}


def _descriptions(cls: type) -> dict[str, str]:
    from kubetune.config.base import document_fields
    from kubetune.config.loader import all_models

    document_fields(all_models())
    return {name: field.description or "" for name, field in cls.model_fields.items()}


def _default(cls: Any, name: str) -> Any:
    field = cls.model_fields[name]
    if field.is_required():
        return REQUIRED
    value = field.get_default(call_default_factory=True)
    return value.model_dump() if hasattr(value, "model_dump") else value


@pytest.mark.parametrize("kind", list(INVOKE_FIELDS))
def test_every_invoke_training_field_has_its_default(kind: str) -> None:
    cls = CLASSES[kind]
    wrong = {}
    for name, expected in INVOKE_FIELDS[kind].items():
        assert name in cls.model_fields, f"{kind} lacks invoke-training's field {name}"
        if expected is REQUIRED:
            continue  # kubetune may default what invoke-training requires
        actual = _default(cls, name)
        if actual != expected:
            wrong[name] = (actual, expected)
    assert wrong == {}, "kubetune default != invoke-training default"


@pytest.mark.parametrize("kind", list(INVOKE_FIELDS))
def test_every_other_field_is_named_a_kubetune_extension(kind: str) -> None:
    docs = _descriptions(CLASSES[kind])
    extra = set(docs) - set(INVOKE_FIELDS[kind]) - {"type"}
    unnamed = sorted(name for name in extra if "kubetune extension" not in docs[name])
    assert unnamed == [], f"{kind}: fields not in invoke-training must say 'kubetune extension'"


def test_target_module_docstring_no_longer_calls_the_default_an_extension() -> None:
    docs = _descriptions(CLASSES["SD_LORA"])
    assert "invoke-training" in docs["unet_lora_target_modules"]
    assert "(kubetune extension)" not in docs["unet_lora_target_modules"]


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.stem)
def test_invoke_training_sample_config_validates_unchanged(path: Path) -> None:
    """The schema accepts them as written; their datasets are not in this repository, so the
    check that local dataset paths exist (test_validate_data_paths) is left out here."""
    result = validate_file(str(path), local_data=False)
    assert result.valid, result.errors


def test_the_sdxl_finetune_samples_are_present() -> None:
    names = {p.name for p in SAMPLES}
    assert {"sdxl_finetune_baroque_1x24gb.yaml", "sdxl_finetune_robocats_1x24gb.yaml"} <= names
    assert len(SAMPLES) >= 10


def test_the_flux_sample_is_present() -> None:
    assert "flux_lora_1x40gb.yaml" in {p.name for p in SAMPLES}


def _lora(**data_loader: Any) -> dict[str, Any]:
    loader = {
        "type": "IMAGE_CAPTION_SD_DATA_LOADER",
        "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"},
        **data_loader,
    }
    return {
        "type": "SD_LORA",
        "base_output_dir": "out",
        "max_train_steps": 1,
        "save_every_n_steps": 1,
        "data_loader": loader,
    }


@pytest.mark.parametrize(
    "loader",
    [
        {"resolution": 500},
        {"resolution": [500, 388]},
        {
            "aspect_ratio_buckets": {
                "target_resolution": 516,
                "start_dim": 264,
                "end_dim": 768,
                "divisible_by": 12,
            }
        },
        {
            "aspect_ratio_buckets": {
                "target_resolution": 512,
                "start_dim": 640,
                "end_dim": 768,
                "divisible_by": 64,
            }
        },
    ],
    ids=["res-500", "res-500x388", "divisible-by-12", "start-above-target"],
)
def test_values_invoke_training_accepts_are_accepted(loader: dict[str, Any]) -> None:
    parse_config(yaml.safe_dump(_lora(**loader)))


def test_fp8_is_rejected_at_validate_with_the_reason() -> None:
    raw = _lora()
    raw["mixed_precision"] = "fp8"
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(raw), name="c.yaml")
    (line,) = err.value.problems
    assert ": mixed_precision: fp8 is not supported" in line and "bf16" in line


def test_multi_word_initializer_token_is_accepted_at_validate() -> None:
    """invoke-training warns and uses the first token (checked at run time in
    test_parity_ti.py); validate must not reject it."""
    raw = {
        "type": "SD_TEXTUAL_INVERSION",
        "model": "m",
        "base_output_dir": "out",
        "max_train_steps": 1,
        "save_every_n_steps": 1,
        "placeholder_token": "<t>",
        "initializer_token": "fluffy cat",
        "data_loader": {
            "type": "TEXTUAL_INVERSION_SD_DATA_LOADER",
            "caption_preset": "object",
            "dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": "data"},
        },
    }
    cfg = parse_config(yaml.safe_dump(raw))
    assert cfg.initializer_token == "fluffy cat"


def test_buckets_follow_invoke_trainings_rule_beyond_the_bounds() -> None:
    """invoke-training's AspectRatioBucketManager: h from start_dim to end_dim in steps of
    divisible_by, w = (target² // h) // divisible_by * divisible_by, plus (w, h); w is not
    clipped to [start_dim, end_dim]."""
    from kubetune.config import AspectRatioBucketConfig
    from runner.data.buckets import build_buckets

    cfg = AspectRatioBucketConfig(
        target_resolution=512, start_dim=640, end_dim=768, divisible_by=64
    )
    expected = {(640, 384), (704, 320), (768, 320)}
    assert build_buckets(cfg) == sorted(expected | {(w, h) for h, w in expected})
    odd = AspectRatioBucketConfig(
        target_resolution=516, start_dim=504, end_dim=528, divisible_by=12
    )
    assert (504, 528) in build_buckets(odd) and (516, 516) in build_buckets(odd)
