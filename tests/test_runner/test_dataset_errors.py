"""A cloud dataset that cannot be read fails the run with one line that names the config field
(`data_loader.dataset.dataset_dir`) and its fix, as a missing local folder does. The errors
come from the real preflight against SeaweedFS (s3) or from opening the store (az)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.config import parse_config
from kubetune.dataset.preflight import start_preflight
from kubetune.errors import KubetuneError
from runner.__main__ import describe_error

FIELD = "data_loader.dataset.dataset_dir"


def _cfg(tmp_path: Path, dataset_dir: str):  # noqa: ANN202
    return parse_config(
        "type: SD_LORA\nmodel: builtin:tiny-sd\nmax_train_steps: 2\nsave_every_n_steps: 1\n"
        f"base_output_dir: {tmp_path / 'out'}\n"
        "data_loader:\n  type: IMAGE_CAPTION_SD_DATA_LOADER\n"
        f"  dataset: {{type: IMAGE_CAPTION_DIR_DATASET, dataset_dir: '{dataset_dir}'}}\n"
    )


def _preflight_error(cfg: object) -> KubetuneError:
    with pytest.raises(KubetuneError) as err:
        start_preflight(cfg, process=False).result(timeout=60)
    return err.value


def test_a_dataset_bucket_that_does_not_exist_names_the_field(
    tmp_path: Path, s3_env: object
) -> None:
    cfg = _cfg(tmp_path, "s3://no-such-bucket-kt/imgs")
    line = describe_error(_preflight_error(cfg), cfg)
    assert line.startswith(f"{FIELD}: ") and "no-such-bucket-kt" in line, line
    assert "output URI" not in line and "\n" not in line  # it is the dataset's bucket
    assert f"point {FIELD} at an existing bucket" in line


def test_an_empty_dataset_prefix_names_the_field(
    tmp_path: Path, s3_env: object, s3_shared_bucket: str
) -> None:
    cfg = _cfg(tmp_path, f"s3://{s3_shared_bucket}/nothing-here")
    line = describe_error(_preflight_error(cfg), cfg)
    assert line.startswith(f"{FIELD}: s3://{s3_shared_bucket}/nothing-here: "), line


def test_an_azure_dataset_without_an_account_names_the_field(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME", raising=False)
    cfg = _cfg(tmp_path, "az://container/imgs")
    line = describe_error(_preflight_error(cfg), cfg)
    assert line.startswith(f"{FIELD}: ") and "account" in line, line


def test_other_errors_are_left_as_they_are(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "s3://some-bucket/imgs")
    err = KubetuneError("out of disk", hint="free some space")
    assert describe_error(err, cfg) == "out of disk (free some space)"
    assert describe_error(err, None) == "out of disk (free some space)"
