"""FLUX_LORA in the schema: invoke-training's sample validates unchanged with its values, and
a combination that cannot train is rejected at validate with the field path and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.config import FluxLoraConfig, load_config, parse_config
from kubetune.errors import ConfigError

SAMPLE = Path(__file__).parents[1] / "data" / "invoke_training_samples" / "flux_lora_1x40gb.yaml"


def _raw(**fields: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "FLUX_LORA",
        "base_output_dir": "out",
        "max_train_steps": 4,
        "save_every_n_steps": 2,
        "data_loader": {
            "type": "IMAGE_CAPTION_FLUX_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"},
        },
    }
    raw.update(fields)
    return raw


def _errors(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(raw), name="c.yaml")
    return "\n".join(err.value.problems)


def test_invoke_training_sample_keeps_its_values() -> None:
    cfg = load_config(SAMPLE)
    assert isinstance(cfg, FluxLoraConfig)
    assert cfg.transformer_learning_rate == 4e-4 and cfg.text_encoder_learning_rate == 4e-4
    assert cfg.data_loader.type == "IMAGE_CAPTION_FLUX_DATA_LOADER"
    assert cfg.data_loader.aspect_ratio_buckets is not None
    assert cfg.data_loader.aspect_ratio_buckets.divisible_by == 128
    assert (cfg.timestep_sampler, cfg.discrete_flow_shift, cfg.guidance_scale) == ("shift", 3, 1)
    assert cfg.lora_checkpoint_format == "kohya" and not cfg.train_text_encoder


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({"train_transformer": False}, "train_transformer", "nothing to train"),
        (
            {"train_text_encoder": True, "cache_text_encoder_outputs": True},
            "cache_text_encoder_outputs",
            "go stale",
        ),
        ({"noise_offset": 0.1}, "noise_offset", "no effect on FLUX_LORA"),
        ({"min_snr_gamma": 5.0}, "min_snr_gamma", "no effect on FLUX_LORA"),
        ({"prediction_type": "epsilon"}, "prediction_type", "no effect on FLUX_LORA"),
        ({"timestep_sampling": "later"}, "timestep_sampling", "timestep_sampler"),
        ({"base_embeddings": {"<t>": "t.safetensors"}}, "base_embeddings", "not supported"),
        (
            {
                "validation_prompts": ["a"],
                "validate_every_n_steps": 2,
                "negative_validation_prompts": ["b"],
            },
            "negative_validation_prompts",
            "validation_true_cfg_scale",
        ),
        ({"use_dora": True}, "use_dora", "invoke_peft"),
        ({"timestep_sampler": "logit"}, "timestep_sampler", ""),
        ({"t5_tokenizer_max_length": 1024}, "t5_tokenizer_max_length", ""),
    ],
)
def test_flux_nonsense_is_rejected_with_field_and_reason(
    fields: dict[str, Any], path: str, reason: str
) -> None:
    text = _errors(_raw(**fields))
    assert f": {path}: " in text and reason in text, text


def test_sd_loader_is_not_a_flux_loader() -> None:
    raw = _raw()
    raw["data_loader"]["type"] = "IMAGE_CAPTION_SD_DATA_LOADER"
    assert "data_loader" in _errors(raw)


def test_negative_prompts_with_true_cfg_are_accepted() -> None:
    cfg = parse_config(
        yaml.safe_dump(
            _raw(
                validation_prompts=["a"],
                validate_every_n_steps=2,
                negative_validation_prompts=["b"],
                validation_true_cfg_scale=4.0,
            )
        )
    )
    assert cfg.negative_validation_prompts == ["b"]
