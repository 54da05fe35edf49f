"""`--format json` is laid out the same by every command (two-space indent, one document):
`launcher report` printed its document on one line, unlike status / submit / pull / list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from ui_support import fake_local_run

from launcher.cli.main import main


@pytest.mark.parametrize("command", ["report", "status", "pull"])
def test_each_command_indents_its_json_alike(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    fake_local_run(tmp_path / "home", tmp_path / "out", "done", final=True, report=True)
    result = CliRunner().invoke(main, [command, "--local", "done", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert result.stdout == json.dumps(json.loads(result.stdout), indent=2) + "\n"
