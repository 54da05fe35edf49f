"""Textual inversion as invoke-training does it (issue #12), on the tiny models with the real
CLIP tokenizer: a multi-token initializer warns and uses its first token; initial_phrase
sets the number of vectors; a multi-vector token is expanded in every caption path
(templates, kept original captions, base_embeddings tokens)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import PLACEHOLDER, load_pipeline, make_config, training_images, write_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
CPU = torch.device("cpu")


data_dir = training_images(n=2)


def test_multi_token_initializer_warns_and_uses_its_first_token(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(
        "SD_TEXTUAL_INVERSION",
        tiny_sd_dir,
        data_dir,
        tmp_path,
        initializer_token="kubetunification",
    )
    with caplog.at_level(logging.WARNING):
        comps, pipe = load_pipeline(cfg)
    first = comps.tokenizer("kubetunification", add_special_tokens=False).input_ids[0]
    table = comps.text_encoder.get_input_embeddings().weight
    vectors = pipe.trainable_parameters()["ti.clip_l"]
    assert torch.equal(vectors, table[[first, first]].float())
    assert any("only the first is used" in r.getMessage() for r in caplog.records)


def test_initial_phrase_sets_the_number_of_vectors(
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    cfg = make_config(
        "SDXL_TEXTUAL_INVERSION",
        tiny_sdxl_dir,
        data_dir,
        tmp_path,
        initializer_token=None,
        initial_phrase="a red dog on grass",
        num_vectors=2,  # ignored: the phrase decides, as in invoke-training
    )
    comps, pipe = load_pipeline(cfg)
    for key, tokenizer, encoder in zip(
        ("ti.clip_l", "ti.clip_g"), comps.tokenizers, comps.text_encoders, strict=True
    ):
        ids = tokenizer("a red dog on grass", add_special_tokens=False).input_ids
        assert len(ids) == 5
        vectors = pipe.trainable_parameters()[key]
        assert torch.equal(vectors, encoder.get_input_embeddings().weight[ids].float())
        assert f"{PLACEHOLDER}_4" in tokenizer.get_vocab()
        assert f"{PLACEHOLDER}_5" not in tokenizer.get_vocab()


def _token_ids(comps: Any, captions: list[str], pipe: Any) -> list[list[int]]:
    ids = pipe.text._ids(comps.tokenizer, captions, CPU)
    return [row[row != comps.tokenizer.pad_token_id].tolist() for row in ids]


def _count(row: list[int], token_id: int) -> int:
    return sum(1 for i in row if i == token_id)


def test_placeholder_in_kept_original_captions_trains_every_vector(
    tiny_sd_dir: Path, tmp_path: Path
) -> None:
    from runner.data import build_train_dataloader

    data = write_dataset(tmp_path / "captioned", n=2)
    for txt in data.glob("*.txt"):
        txt.write_text(f"{PLACEHOLDER} sitting on a table")
    cfg = make_config(
        "SD_TEXTUAL_INVERSION",
        tiny_sd_dir,
        data,
        tmp_path / "out",
        data_loader={
            "type": "TEXTUAL_INVERSION_SD_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(data)},
            "caption_templates": ["a photo of {}"],
            "keep_original_captions": True,
            "resolution": 64,
        },
        num_vectors=3,
    )
    comps, pipe = load_pipeline(cfg)
    loader = build_train_dataloader(cfg, seed=0, batch_size=2, device_is_cuda=False)
    captions = list(next(iter(loader))["caption"])
    assert captions[0] == f"a photo of {PLACEHOLDER} {PLACEHOLDER} sitting on a table"
    new_ids = comps.tokenizer.convert_tokens_to_ids(
        [PLACEHOLDER, f"{PLACEHOLDER}_1", f"{PLACEHOLDER}_2"]
    )
    for row in _token_ids(comps, captions, pipe):
        assert [_count(row, i) for i in new_ids] == [2, 2, 2]  # template and original text


def test_base_embedding_tokens_in_captions_use_every_vector(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from runner.checkpoint.exporters import export_embeddings

    emb = export_embeddings(tmp_path / "emb", "<base>", [torch.randn(2, 32)])
    cfg = make_config(
        "SD_LORA", tiny_sd_dir, data_dir, tmp_path / "out", base_embeddings={"<base>": str(emb)}
    )
    comps, pipe = load_pipeline(cfg)
    ids = comps.tokenizer.convert_tokens_to_ids(["<base>", "<base>_1"])
    (row,) = _token_ids(comps, ["a <base> cat"], pipe)
    assert [_count(row, i) for i in ids] == [1, 1]


def test_expansion_is_idempotent_and_leaves_single_vectors_alone() -> None:
    from runner.models.embeddings import expand_placeholders

    expansions = {"<t>": "<t> <t>_1 <t>_2"}
    once = expand_placeholders("x <t> y <t>", expansions)
    assert once == "x <t> <t>_1 <t>_2 y <t> <t>_1 <t>_2"
    assert expand_placeholders(once, expansions) == once
    assert expand_placeholders("only <t>_1 here", expansions) == "only <t>_1 here"


def test_vectors_are_pulled_towards_the_table_std_after_each_step(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """invoke-training's restore_original_embeddings: new *= (std(old rows) / std(new))**0.1."""
    cfg = make_config("SD_TEXTUAL_INVERSION", tiny_sd_dir, data_dir, tmp_path)
    comps, pipe = load_pipeline(cfg)
    new_ids = comps.tokenizer.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1"])
    table = comps.text_encoder.get_input_embeddings().weight.detach()
    old_rows = torch.cat([table[: min(new_ids)], table[max(new_ids) + 1 :]])
    before = pipe.trainable_parameters()["ti.clip_l"].detach().clone()
    pipe.after_optimizer_step()
    expected = before * (old_rows.float().std() / before.std()) ** 0.1
    torch.testing.assert_close(pipe.trainable_parameters()["ti.clip_l"].detach(), expected)
