"""Caption behaviours: prefix, presets, templates with TI tokens, keep/shuffle, determinism."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from data_fixtures import lora_config, lora_ti_config, ti_config, write_image_dir

from kubetune.dataset.captions import OBJECT_TEMPLATES, STYLE_TEMPLATES, CaptionBuilder
from runner.data import build_train_dataloader

CAPDIR = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "/unused"}


def _builder(cfg, text: str | None = "<cat>") -> CaptionBuilder:
    return CaptionBuilder(cfg.data_loader, text)


def test_lora_prefix_and_plain() -> None:
    assert (
        _builder(lora_config(CAPDIR, caption_prefix="sks")).build("a dog", random.Random(0))
        == "sks a dog"
    )
    assert _builder(lora_config(CAPDIR)).build("a dog", random.Random(0)) == "a dog"


@pytest.mark.parametrize(
    ("preset", "templates"), [("object", OBJECT_TEMPLATES), ("style", STYLE_TEMPLATES)]
)
def test_presets_fill_the_placeholder(preset: str, templates: list[str]) -> None:
    builder = _builder(ti_config(CAPDIR, caption_preset=preset))
    made = {builder.build(None, random.Random(s)) for s in range(200)}
    assert made <= {t.replace("{}", "<cat>") for t in templates}
    assert len(made) > 5 and all("<cat>" in c for c in made)


def test_custom_templates_and_lora_ti_token_string() -> None:
    cfg = lora_ti_config(CAPDIR, caption_templates=["{} on a table", "art by {}"])
    builder = CaptionBuilder(cfg.data_loader, "<tok> <tok>_1")
    made = {builder.build(None, random.Random(s)) for s in range(50)}
    assert made == {"<tok> <tok>_1 on a table", "art by <tok> <tok>_1"}


def test_keep_original_captions_puts_the_template_first() -> None:
    cfg = ti_config(CAPDIR, caption_templates=["a photo of {}"], keep_original_captions=True)
    assert _builder(cfg).build("on the beach", random.Random(0)) == "a photo of <cat> on the beach"


def test_shuffle_delimiter_is_seeded_and_keeps_all_parts() -> None:
    cfg = ti_config(
        CAPDIR, caption_templates=["{}"], keep_original_captions=True, shuffle_caption_delimiter=","
    )
    builder = _builder(cfg)
    caption = "red, blue, green, yellow, purple"
    outs = [builder.build(caption, random.Random(s)) for s in range(20)]
    for out in outs:
        assert sorted(out.split(", ")) == sorted(["<cat> red", "blue", "green", "yellow", "purple"])
    assert len(set(outs)) > 3
    assert outs == [builder.build(caption, random.Random(s)) for s in range(20)]


def test_loader_captions_are_deterministic_by_seed(tmp_path: Path) -> None:
    write_image_dir(tmp_path / "d", [(32, 32)] * 6)
    cfg = ti_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")},
        keep_original_captions=True,
        shuffle_caption_delimiter=" ",
    )

    def captions(seed: int) -> list[str]:
        loader = build_train_dataloader(cfg, seed=seed, batch_size=2, device_is_cuda=False)
        return [c for b in loader for c in b["caption"]]

    first = captions(11)
    assert first == captions(11) and first != captions(12)
    assert all("<cat>" in c and "caption" in c for c in first)


def test_ti_loader_defaults_to_the_placeholder_token_of_the_config(tmp_path: Path) -> None:
    """The caption carries the token once, however many vectors: the text conditioner
    expands it when tokenizing (tests/test_runner/test_parity_ti.py)."""
    write_image_dir(tmp_path / "d", [(32, 32)] * 2, captions=False)
    cfg = lora_ti_config(
        {"type": "IMAGE_DIR_DATASET", "dataset_dir": str(tmp_path / "d")},
        num_vectors=3,
        caption_templates=["x {}"],
    )
    loader = build_train_dataloader(cfg, seed=0, batch_size=2, device_is_cuda=False)
    assert next(iter(loader))["caption"] == ["x <tok>"] * 2
    given = build_train_dataloader(
        cfg, seed=0, batch_size=2, device_is_cuda=False, placeholder_text="<a> <b>"
    )
    assert next(iter(given))["caption"] == ["x <a> <b>"] * 2
