"""Generate Config is `launcher validate`: the same problems, line for line, for every bad
config the CLI's tests use, and every problem placed at a field path the form knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config_files import validate_file, validate_text
from launcher.ui.configs import _problem

BAD = sorted((Path(__file__).parents[1] / "data" / "bad" / "config").glob("*.yaml"))


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_generate_reports_exactly_what_validate_reports(path: Path) -> None:
    by_file = validate_file(str(path))
    by_text, _ = validate_text(path.read_text(), str(path), path.resolve().parent)
    assert (by_text.valid, by_text.errors) == (by_file.valid, by_file.errors)
    for line in by_text.errors:
        problem = _problem(line, str(path))
        assert problem["text"] in line and problem["message"]
