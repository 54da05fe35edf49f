"""`launcher submit --local` (and the UI's Start Training, locally) refuses, before anything
starts, a run whose object storage this machine cannot use for a reason the user must fix: a
bucket that does not exist (the outputs' `storage.bucket`, or a dataset's `s3://` bucket) or
no credentials at all. One line naming the field and the fix, exit 2, and no local run state
written (it used to say "submitted", exit 0, and fail in the background a minute later).
Against a real S3 server (SeaweedFS)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from s3server import S3Server

from launcher.cli.main import main

ROOT = Path(__file__).parents[2]


def _config(folder: Path, endpoint: str, *, bucket: str, dataset: str | None = None) -> Path:
    """The quickstart, its outputs in `bucket`; `dataset`: an `s3://` dataset instead of the
    bundled sample folder."""
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data.pop("base_output_dir")
    data["storage"] = {"provider": "s3", "endpoint_url": endpoint, "bucket": bucket}
    where = dataset or str(ROOT / "examples" / "sample_data")
    data["data_loader"]["dataset"]["dataset_dir"] = where
    data["job"]["name"] = "storage-check"
    path = folder / "lora.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _submit(config: Path, home: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    monkeypatch.setenv("KUBETUNE_HOME", str(home))
    result = CliRunner().invoke(main, ["submit", "--local", str(config)])
    return result.exit_code, result.stderr


def _refused(code: int, stderr: str, home: Path) -> str:
    """The one error line; nothing was started or recorded."""
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, stderr)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
    return lines[0]


def test_missing_output_bucket(
    tmp_path: Path, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, s3_env.endpoint, bucket="no-such-bucket-out")
    line = _refused(*_submit(config, tmp_path / "home", monkeypatch), tmp_path / "home")
    assert "storage.bucket" in line and "'no-such-bucket-out' does not exist" in line, line
    assert "create the bucket" in line, line


def test_missing_dataset_bucket(
    tmp_path: Path, s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(
        tmp_path, s3_env.endpoint, bucket=s3_bucket, dataset="s3://no-such-bucket-data/images"
    )
    line = _refused(*_submit(config, tmp_path / "home", monkeypatch), tmp_path / "home")
    assert "data_loader.dataset.dataset_dir" in line, line
    assert "'no-such-bucket-data' does not exist" in line and "create the bucket" in line, line


def test_no_credentials(
    tmp_path: Path, s3_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    config = _config(tmp_path, s3_env.endpoint, bucket=s3_bucket)
    line = _refused(*_submit(config, tmp_path / "home", monkeypatch), tmp_path / "home")
    assert "storage.bucket" in line and "no credentials set" in line, line
    assert "AWS_ACCESS_KEY_ID" in line, line


def test_ui_start_training_here_refuses_a_missing_bucket_at_its_field(
    tmp_path: Path, s3_env: S3Server
) -> None:
    """The UI's Start Training (on this machine) refuses as `submit --local` does: a problem
    at the field, no run started."""
    from launcher.backends.local import LocalBackend
    from launcher.ui.runs import Runs
    from launcher.ui.security import UiSettings
    from launcher.ui.submit import start_training

    config = _config(tmp_path, s3_env.endpoint, bucket="no-such-bucket-ui")
    local = LocalBackend(home=tmp_path / "home")
    result = start_training(
        yaml.safe_load(config.read_text()), target="local", sweeps=[], replace=False,
        runs=Runs(local_only=True, local=local), settings=UiSettings(port=0, roots=[tmp_path]),
    )  # fmt: skip
    assert "submitted" not in result and not result["valid"], result
    assert [p["path"] for p in result["problems"]] == ["storage.bucket"], result["problems"]
    assert "'no-such-bucket-ui' does not exist" in result["problems"][0]["message"]
    assert local.list() == []


def test_an_endpoint_that_does_not_answer_is_left_to_the_run(
    tmp_path: Path, s3_env: S3Server
) -> None:
    """Not a refusal (the run's own retries decide, as before), and one bounded attempt: the
    port is bound, not listening, so it refuses connections until the test ends."""
    import socket

    from kubetune.config import load_config
    from launcher.local_storage_check import storage_problems

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{closed.getsockname()[1]}"
        cfg = load_config(_config(tmp_path, endpoint, bucket="any-bucket"))
        assert storage_problems(cfg) == []
