"""Typed settings per component, built from the config in one place
(``runner.session.settings``)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from train_support import make_config

from kubetune.config import output_uri
from runner.data.loader_settings import LoaderSettings
from runner.models.loading import ModelSettings
from runner.session.settings import RunSettings, lease_settings
from runner.training.cadence import Cadence

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, **overrides: object):  # type: ignore[no-untyped-def]
    return make_config("SD_LORA", tmp_path / "model", tmp_path / "data", tmp_path / "out",
                       **overrides)  # fmt: skip


def test_each_component_gets_its_own_typed_section(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, save_every_n_steps=3, validate_every_n_steps=5, max_checkpoints=2,
               lease_timeout_seconds=40.0, lease_wait_seconds=0.0)  # fmt: skip
    s = RunSettings.from_config(cfg, seed=11, work_dir=tmp_path / "work", is_main=True)
    assert s.model == ModelSettings(
        str(tmp_path / "model"), hf_variant=None, vae_model=None, weight_dtype="float32"
    )
    assert s.checkpoint.cadence == Cadence(3, None) and s.checkpoint.seed == 11
    assert s.checkpoint.work_dir == tmp_path / "work" and s.checkpoint.is_main
    assert s.checkpoint.compat["type"] == "SD_LORA" and s.checkpoint.compat["lora_rank_dim"] == 4
    assert s.validation.cadence == Cadence(5, None)
    assert s.validation.seed == 7  # the config's, as invoke-training seeds validation
    assert s.caches.local_root == Path(output_uri(cfg)) / "cache"  # a local run: beside it
    assert set(s.caches.namespaces) == {"vae", "text"} and s.caches.mirror_uri is None
    assert s.tensorboard_dir is None  # report_to: None
    lease = lease_settings(cfg)
    assert (lease.timeout_s, lease.wait_s) == (40.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.model.model = "other"  # type: ignore[misc]


def test_tensorboard_only_on_the_main_process(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, report_to="tensorboard")
    main = RunSettings.from_config(cfg, seed=1, work_dir=tmp_path, is_main=True)
    other = RunSettings.from_config(cfg, seed=1, work_dir=tmp_path, is_main=False)
    assert main.tensorboard_dir == tmp_path / "logs" and other.tensorboard_dir is None
    assert not other.checkpoint.is_main


def test_model_identity_keeps_the_key_stored_caches_were_written_under() -> None:
    model = ModelSettings("m", hf_variant="fp16", weight_dtype="bfloat16",
                         base_embeddings={"<t>": "t.safetensors"})  # fmt: skip
    assert json.loads(model.identity()) == {
        "base_embeddings": {"<t>": "t.safetensors"},
        "hf_variant": "fp16",
        "model": "m",
        "vae_model": None,
        "weight_dtype": "bfloat16",
    }
    assert model.identity() == json.dumps(json.loads(model.identity()), sort_keys=True)


OWNED = ("runner/session/run.py", "runner/session/build.py", "runner/session/settings.py",
         "runner/training/encoder_cache.py",
         "runner/checkpoint", "runner/models", "runner/pipelines", "runner/data/cache.py",
         "kubetune/dataset/preflight.py", "kubetune/dataset/preflight_start.py",
         "kubetune/dataset/preflight_fork.py", "kubetune/dataset/preflight_replies.py",
         "runner/data/loader.py", "runner/data/train_dataset.py", "runner/data/resumable.py",
         "runner/data/loader_settings.py")  # fmt: skip


def test_components_do_not_probe_the_config_with_getattr() -> None:
    """``getattr(cfg, "x", default)`` hides a missing field; settings name every field."""
    probe = re.compile(r"getattr\((self\.)?(cfg|config|loader_cfg)\b")
    files = [p for name in OWNED for p in sorted((ROOT / name).rglob("*.py")) or [ROOT / name]]
    found = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in files
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if probe.search(line)
    ]
    assert found == []


def test_loader_settings_read_each_field_by_type(tmp_path: Path) -> None:
    lora = _cfg(tmp_path, data_loader={
        "type": "IMAGE_CAPTION_SD_DATA_LOADER", "caption_dropout_rate": 0.25,
        "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "d",
                    "keep_in_memory": True}})  # fmt: skip
    s = LoaderSettings.from_config(lora)
    assert s.section is lora.data_loader and s.placeholder_token is None
    assert (s.caption_dropout_rate, s.keep_in_memory, s.keep_class_in_memory) == (0.25, True, False)
    ti = make_config("SD_TEXTUAL_INVERSION", tmp_path, tmp_path, tmp_path)
    s = LoaderSettings.from_config(ti)
    assert s.placeholder_token == "<kbtn>" and s.caption_dropout_rate == 0.0
    assert not s.keep_in_memory
    hub = {"type": "HF_HUB_IMAGE_CAPTION_DATASET", "dataset_name": "a/b"}
    hub_cfg = _cfg(tmp_path, data_loader={"type": "IMAGE_CAPTION_SD_DATA_LOADER", "dataset": hub})
    assert not LoaderSettings.from_config(hub_cfg).keep_in_memory  # the type has no such field
    dreambooth = _cfg(tmp_path, data_loader={
        "type": "DREAMBOOTH_SD_DATA_LOADER", "instance_caption": "sks", "class_caption": "dog",
        "caption_dropout_rate": 0.5,
        "instance_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": "i"},
        "class_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": "c",
                          "keep_in_memory": True}})  # fmt: skip
    s = LoaderSettings.from_config(dreambooth)
    assert (s.caption_dropout_rate, s.keep_in_memory, s.keep_class_in_memory) == (0.5, False, True)


# Where the whole config may still go: the entry, the session (which makes the settings), the
# per-type pipelines and the data loader (their config sections are their typed settings) and
# the run's events (its name and hash). Every other component takes its own settings.
CONFIG_READERS = ("runner/__main__.py", "runner/session/", "runner/pipelines/",
                  "runner/data/loader.py", "runner/data/loader_settings.py",
                  "runner/reporting/run_events.py", "runner/training/noise.py")  # fmt: skip


def test_the_whole_config_stops_at_the_settings() -> None:
    readers = sorted(
        str(p.relative_to(ROOT))
        for p in (ROOT / "runner").rglob("*.py")
        if re.search(r"\bPipelineConfig\b", p.read_text())
    )
    assert readers, "the walk found no module at all"
    assert [r for r in readers if not r.startswith(CONFIG_READERS)] == []


def test_runner_help_says_when_to_use_it_with_an_example(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from runner.__main__ import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "python -m runner examples/quickstart.yaml" in text
    assert "launcher submit --local" in text and "exit status" in text.lower()
