"""Issue 15's knobs in the schema: each is a documented kubetune extension, off by default,
and a combination that makes no sense is rejected at validate with the reason (the field
paths of the bad configs are also in tests/data/bad/config/2xx-knob-*.yaml)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from kubetune.config import PIPELINE_TYPES, parse_config
from kubetune.config.base import document_fields
from kubetune.config.data import ImageCaptionSDDataLoaderConfig
from kubetune.config.extensions import LoraKnobs, TrainingKnobs
from kubetune.config.flux import UNUSED_KNOBS
from kubetune.config.pipelines import SdLoraConfig
from kubetune.config.training_types import PIPELINE_CLASSES
from kubetune.errors import ConfigError
from launcher.config_files import starter_config

KNOB_CLASSES = (TrainingKnobs, LoraKnobs)


def _raw(kind: str = "SD_LORA", **fields: Any) -> dict[str, Any]:
    loader: dict[str, Any] = {
        "type": "IMAGE_CAPTION_SD_DATA_LOADER",
        "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"},
        "resolution": 64,
    }
    raw: dict[str, Any] = {
        "type": kind,
        "base_output_dir": "out",
        "max_train_steps": 4,
        "save_every_n_steps": 2,
        "data_loader": loader,
    }
    if "TEXTUAL_INVERSION" in kind:
        raw.update(placeholder_token="<t>", initializer_token="cat")
        loader.update(type="TEXTUAL_INVERSION_SD_DATA_LOADER", caption_preset="object")
    raw.update(fields)
    return raw


def _errors(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(raw))
    return "\n".join(info.value.problems)


def test_knob_fields_are_documented_kubetune_extensions() -> None:
    names = [n for cls in KNOB_CLASSES for n in cls.model_fields]
    names.append("caption_dropout_rate")
    document_fields([*KNOB_CLASSES, ImageCaptionSDDataLoaderConfig])
    for name in names:
        owner = next(
            c for c in (*KNOB_CLASSES, ImageCaptionSDDataLoaderConfig) if name in c.model_fields
        )
        doc = " ".join((owner.model_fields[name].description or "").split())
        assert "kubetune extension" in doc, f"{name}: {doc!r}"


def test_knobs_default_to_off() -> None:
    cfg = parse_config(yaml.safe_dump(_raw()))
    assert isinstance(cfg, SdLoraConfig)
    assert (cfg.noise_offset, cfg.input_perturbation) == (0.0, 0.0)
    assert (cfg.timestep_sampling, cfg.loss_type, cfg.zero_terminal_snr) == (
        "uniform",
        "l2",
        False,
    )
    assert cfg.ema_decay is None and not cfg.use_dora and cfg.lora_dropout == 0.0
    assert cfg.data_loader.caption_dropout_rate == 0.0


def test_all_knobs_on_validate_for_lora_and_ti() -> None:
    knobs = dict(
        noise_offset=0.1,
        input_perturbation=0.1,
        timestep_sampling="later",
        timestep_bias_multiplier=3.0,
        timestep_bias_portion=0.3,
        zero_terminal_snr=True,
        prediction_type="v_prediction",
        loss_type="huber",
        huber_c=0.2,
        ema_decay=0.99,
        ema_on_cpu=True,
    )
    lora = _raw(use_dora=True, lora_dropout=0.1, lora_checkpoint_format="invoke_peft", **knobs)
    lora["data_loader"]["caption_dropout_rate"] = 0.2
    assert parse_config(yaml.safe_dump(lora)).use_dora
    for kind in ("SD_TEXTUAL_INVERSION", "SDXL_LORA_AND_TEXTUAL_INVERSION"):
        assert parse_config(yaml.safe_dump(_raw(kind, **knobs))).ema_decay == 0.99


@pytest.mark.parametrize(
    ("fields", "path", "reason"),
    [
        ({"use_dora": True}, "use_dora", "kohya LoRA format cannot hold DoRA"),
        ({"huber_c": 0.2}, "huber_c", "only used by loss_type huber / smooth_l1"),
        ({"timestep_bias_portion": 0.5}, "timestep_bias_portion", "only used by"),
        (
            {"timestep_sampling": "logit_normal", "timestep_bias_multiplier": 2},
            "timestep_bias_multiplier",
            "it is logit_normal",
        ),
        ({"zero_terminal_snr": True}, "zero_terminal_snr", "set prediction_type: v_prediction"),
        ({"ema_on_cpu": True}, "ema_on_cpu", "set ema_decay"),
    ],
)
def test_nonsense_combinations_name_field_and_reason(
    fields: dict[str, Any], path: str, reason: str
) -> None:
    text = _errors(_raw(**fields))
    assert f": {path}: " in text and reason in text, text


def test_knobs_a_type_cannot_use_are_rejected_with_the_reason() -> None:
    ti = _raw("SD_TEXTUAL_INVERSION", use_dora=True)
    assert "use_dora: not valid for type SD_TEXTUAL_INVERSION" in _errors(ti)
    ti = _raw("SDXL_LORA_AND_TEXTUAL_INVERSION")
    ti["data_loader"]["caption_dropout_rate"] = 0.1
    text = _errors(ti)
    assert "data_loader.caption_dropout_rate: textual inversion captions carry" in text, text


@pytest.mark.parametrize("pipeline_type", PIPELINE_TYPES)
def test_starter_configs_mention_the_knobs_the_type_takes(pipeline_type: str) -> None:
    text = starter_config(pipeline_type)
    cls = next(c for c in PIPELINE_CLASSES if c.model_fields["type"].default == pipeline_type)
    unused = UNUSED_KNOBS if pipeline_type == "FLUX_LORA" else ()
    knobs = [
        n for k in KNOB_CLASSES for n in k.model_fields if n in cls.model_fields and n not in unused
    ]
    assert len(knobs) >= len(TrainingKnobs.model_fields) - len(unused)
    for name in knobs:
        assert f"# {name}: " in text, name
    captioned = ("SD_LORA", "SDXL_LORA", "SDXL_FINETUNE", "FLUX_LORA")  # image-caption loaders
    assert ("caption_dropout_rate" in text) == (pipeline_type in captioned)
    assert parse_config(text).type == pipeline_type  # still valid as written
