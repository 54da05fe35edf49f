"""The form generated from the schema: every field of every type, the schema's defaults,
sections as invoke-training's UI has them."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from kubetune.config import PIPELINE_CLASSES, SdLoraConfig
from launcher.ui.forms import GENERAL, forms, section_of


def _tab(cls: type) -> dict[str, Any]:
    return forms([cls])[0]


def test_every_top_level_field_has_a_widget_with_the_schemas_default() -> None:
    for cls in PIPELINE_CLASSES:
        widgets = {w["path"]: w for w in _tab(cls)["widgets"]}
        for name, info in cls.model_fields.items():
            w = widgets.get(name) or next(v for p, v in widgets.items() if p.startswith(name))
            if w["kind"] in ("optional", "union", "group"):
                continue
            default = info.get_default(call_default_factory=True)
            assert w["default"] == default or (w["required"] and info.is_required()), name


class _Extended(SdLoraConfig):
    """SD_LORA with two fields only this test knows."""

    brand_new_ratio: float = Field(default=0.25, gt=0, le=1)
    """A new knob's help text."""
    brand_new_mode: str | None = None


def test_a_field_added_to_the_schema_appears_with_its_type_bounds_and_help() -> None:
    widgets = {w["path"]: w for w in _tab(_Extended)["widgets"]}
    ratio = widgets["brand_new_ratio"]
    assert ratio["kind"] == "number" and ratio["default"] == 0.25
    assert ratio["bounds"] == {"exclusiveMinimum": 0, "maximum": 1}
    assert ratio["help"] == "A new knob's help text."
    assert (ratio["section"], ratio["advanced"]) == (GENERAL, True)
    assert widgets["brand_new_mode"]["nullable"] and widgets["brand_new_mode"]["kind"] == "text"


def test_sections_follow_invoke_trainings_ui() -> None:
    assert section_of("model") == ("Basic", False)
    assert section_of("data_loader.dataset.dataset_dir") == ("Data Source", False)
    assert section_of("data_loader.aspect_ratio_buckets.start_dim")[0] == "Aspect Ratio Bucketing"
    assert section_of("data_loader.resolution")[0] == "Data Loading"
    assert section_of("placeholder_token")[0] == "Textual Inversion"
    assert section_of("optimizer.learning_rate")[0] == "Optimizer"
    assert section_of("lora_rank_dim") == (GENERAL, True)
    assert section_of("validation_prompts")[0] == "Validation"
    tab = _tab(PIPELINE_CLASSES[0])
    union = next(w for w in tab["widgets"] if w["path"] == "optimizer.optimizer_type")
    assert union["kind"] == "union" and union["choices"] == ["AdamW", "Prodigy"]
    prodigy_lr = next(w for w in tab["widgets"] if w["id"] == "optimizer[Prodigy].learning_rate")
    assert prodigy_lr["default"] == 1.0 and prodigy_lr["parent"] == [union["id"], "Prodigy"]
