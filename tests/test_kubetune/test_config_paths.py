"""Relative paths in a config file resolve against the file's folder, whatever the working
folder (issue #27 item 3); `--set` paths against the working folder; hub names and URIs stay.
`base_output_dir` may be left out when `storage:` decides where the outputs go (item 6)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from kube_configs import config_dict

from kubetune.config import load_config, output_uri, run_name
from kubetune.errors import ConfigError


def _write(folder: Path, data: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _local(**fields: object) -> dict:
    data = config_dict()
    del data["storage"], data["job"]
    data["data_loader"] = {
        "dataset": {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": "data/train.jsonl"}
    }
    return {**data, "base_output_dir": "out/my-run", **fields}


def test_relative_paths_resolve_against_the_config_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    configs = tmp_path / "configs"
    (configs / "models" / "tiny").mkdir(parents=True)
    path = _write(configs, _local(model="models/tiny", vae_model="stabilityai/sd-vae-ft-mse",
                                  base_embeddings={"<a>": "emb/a.safetensors"}))  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(path))
    assert cfg.base_output_dir == str(configs / "out" / "my-run")
    assert output_uri(cfg) == str(configs / "out" / "my-run") and run_name(cfg) == "my-run"
    assert cfg.data_loader.dataset.jsonl_path == str(configs / "data" / "train.jsonl")
    assert cfg.model == str(configs / "models" / "tiny")  # exists beside the file
    assert cfg.vae_model == "stabilityai/sd-vae-ft-mse"  # a hub name stays one
    assert cfg.base_embeddings == {"<a>": str(configs / "emb" / "a.safetensors")}


def test_uris_absolute_and_home_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    data = _local(model="builtin:tiny-sd", base_output_dir="~/runs/r")
    data["data_loader"]["dataset"]["jsonl_path"] = "s3://bucket/data/train.jsonl"
    cfg = load_config(_write(tmp_path / "c", data))
    assert cfg.model == "builtin:tiny-sd"
    assert cfg.data_loader.dataset.jsonl_path == "s3://bucket/data/train.jsonl"
    assert cfg.base_output_dir == str(tmp_path / "home" / "runs" / "r")
    absolute = _local(base_output_dir=str(tmp_path / "abs"), model="./weights.safetensors")
    cfg = load_config(_write(tmp_path / "d", absolute))
    assert cfg.base_output_dir == str(tmp_path / "abs")
    assert cfg.model == str(tmp_path / "d" / "weights.safetensors")  # explicit ./ and suffix


def test_set_paths_resolve_against_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _write(tmp_path / "configs", _local())
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path, overrides=["base_output_dir=mine/r",
                                       "data_loader.dataset.jsonl_path=d/t.jsonl"])  # fmt: skip
    assert cfg.base_output_dir == str(tmp_path / "mine" / "r")
    assert cfg.data_loader.dataset.jsonl_path == str(tmp_path / "d" / "t.jsonl")


def test_base_output_dir_is_optional_with_storage(tmp_path: Path) -> None:
    data = config_dict()
    del data["base_output_dir"]
    cfg = load_config(_write(tmp_path / "a", data))
    assert cfg.base_output_dir is None and output_uri(cfg) == "s3://kubetune/kubetune/my-run"
    del data["job"]
    with pytest.raises(ConfigError, match=r"run.yaml:\d+: job.name: missing; name the run"):
        load_config(_write(tmp_path / "b", data))
    local = _local()
    del local["base_output_dir"]
    with pytest.raises(ConfigError, match=r"run.yaml:1: base_output_dir: missing; .*storage:"):
        load_config(_write(tmp_path / "c", local))


def test_the_field_docstring_says_kubetune_extension() -> None:
    from kubetune.config.base import field_docstrings
    from kubetune.config.pipelines import BasePipelineConfig

    doc = field_docstrings(BasePipelineConfig)["base_output_dir"]
    assert "kubetune extension" in doc and "relative to the config file" in doc


def test_name_gives_a_local_run_its_own_output_folder(tmp_path: Path) -> None:
    """`submit --name other` of a local config: the outputs go beside the original run's, in
    a folder of that name (not into the other run's folder, whose checkpoints it would
    resume); an explicit --set base_output_dir wins."""
    from launcher import api

    path = _write(tmp_path / "configs", _local())
    cfg = api.load(path, name="other")
    assert cfg.job is not None and cfg.job.name == "other"
    assert cfg.base_output_dir == str(tmp_path / "configs" / "out" / "other")
    mine = api.load(path, [f"base_output_dir={tmp_path / 'mine'}"], name="other")
    assert mine.base_output_dir == str(tmp_path / "mine")
