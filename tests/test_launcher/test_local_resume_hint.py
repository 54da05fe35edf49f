"""A stopped local run says the exact command that resumes it. "`launcher submit --local` of
its config" was not enough for a run submitted with `--name` / `--set`: the file alone is
another config ("already exists with a different config"). The run's own stored config.yaml
is the same config (the same hash the resubmit compares), so the hint names it, and so does
the refusal of a different config. The runs are written as LocalBackend writes them
(`ui_support.fake_local_run`): no training is needed to read their status."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from ui_support import fake_local_run

from kubetune.config import config_hash, load_config
from launcher.cli.main import main

ROOT = Path(__file__).parents[2]


def _cli(home: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.setenv("KUBETUNE_HOME", str(home))
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def _hinted_config(text: str, home: Path, run: str) -> Path:
    stored = home / "runs" / run / "config.yaml"
    assert f"`launcher submit --local {shlex.quote(str(stored))}`" in text, text
    return stored


@pytest.mark.parametrize(("exit_code", "cancelled"), [(143, False), (143, True)])
def test_a_stopped_run_names_the_config_that_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_code: int, cancelled: bool
) -> None:
    home = tmp_path / "kube tune"  # a space: the command must still paste as one argument
    fake_local_run(home, tmp_path / "out", "stopped", exit_code=exit_code, step=20)
    if cancelled:
        (home / "runs" / "stopped" / "cancelled").touch()
    code, out, err = _cli(home, monkeypatch, "status", "--local", "stopped", "--format", "json")
    assert code == 0, err
    status = json.loads(out)
    assert status["phase"] == ("Cancelled" if cancelled else "Preempted"), status
    stored = _hinted_config(status["message"], home, "stopped")
    assert config_hash(load_config(stored)) == status["config_hash"]  # resumes, not refused


def test_a_different_config_refused_names_the_runs_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    fake_local_run(home, tmp_path / "out", "stopped", exit_code=143, step=20)
    data = yaml.safe_load((home / "runs" / "stopped" / "config.yaml").read_text())
    data["max_train_steps"] = 41  # the user's file without the --set of the first submit
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(data, sort_keys=False))
    code, _, err = _cli(home, monkeypatch, "submit", "--local", str(other))
    assert code == 2 and "already exists with a different config" in err, err
    _hinted_config(err, home, "stopped")
