"""SDXL_FINETUNE's schema (issue #25): invoke-training's two sample configs load with its
meaning, the save formats it has are the ones accepted, and LoRA-only fields are rejected."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune.config import SdxlFinetuneConfig, load_config, parse_config
from kubetune.errors import ConfigError

SAMPLES = Path(__file__).parents[1] / "data" / "invoke_training_samples"


def _raw(**fields: object) -> dict[str, object]:
    return {
        "type": "SDXL_FINETUNE",
        "base_output_dir": "out",
        "max_train_steps": 2,
        "save_every_n_steps": 1,
        "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"},
        },
        **fields,
    }


def _problems(raw: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(yaml.safe_dump(raw), name="c.yaml")
    return "\n".join(err.value.problems)


def test_robocats_sample_means_what_invoke_training_means() -> None:
    cfg = load_config(SAMPLES / "sdxl_finetune_robocats_1x24gb.yaml")
    assert isinstance(cfg, SdxlFinetuneConfig)
    assert cfg.optimizer.use_8bit and cfg.optimizer.learning_rate == 2e-5
    assert (cfg.save_checkpoint_format, cfg.save_dtype) == ("trained_only_diffusers", "float16")
    assert cfg.cache_vae_outputs and cfg.cache_text_encoder_outputs
    assert cfg.max_checkpoints == 1 and cfg.data_loader.caption_prefix == "In the robocat style,"


def test_baroque_sample_trains_by_epochs() -> None:
    cfg = load_config(SAMPLES / "sdxl_finetune_baroque_1x24gb.yaml")
    assert (cfg.max_train_epochs, cfg.save_every_n_epochs, cfg.validate_every_n_epochs) == (
        50,
        3,
        3,
    )


@pytest.mark.parametrize("fmt", ["full_diffusers", "trained_only_diffusers"])
def test_both_invoke_training_save_formats_are_accepted(fmt: str) -> None:
    assert parse_config(yaml.safe_dump(_raw(save_checkpoint_format=fmt))).type == "SDXL_FINETUNE"


def test_an_unknown_save_format_names_the_field_and_the_choices() -> None:
    text = _problems(_raw(save_checkpoint_format="kohya"))
    assert "save_checkpoint_format" in text and "trained_only_diffusers" in text, text


def test_lora_fields_are_not_fine_tune_fields() -> None:
    text = _problems(_raw(lora_rank_dim=4))
    assert "lora_rank_dim" in text, text


def test_cached_latents_with_random_flip_are_accepted() -> None:
    """Both orientations are cached (issue #28, as kohya; invoke-training refuses it)."""
    raw = _raw(cache_vae_outputs=True)
    raw["data_loader"]["random_flip"] = True  # type: ignore[index]
    cfg = parse_config(yaml.safe_dump(raw), name="c.yaml")
    assert cfg.cache_vae_outputs and cfg.data_loader.random_flip
