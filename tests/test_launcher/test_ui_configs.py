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


def test_each_tab_opens_on_its_starter_config(tmp_path: Path) -> None:
    """As invoke-training's UI opens each tab on a reference config, each tab comes with the
    values `launcher init --type T` writes (its relative paths under the served folder)."""
    import json
    import urllib.request

    import yaml

    from kubetune.config import PIPELINE_TYPES
    from launcher.config_files import starter_config
    from launcher.ui.security import UiSettings
    from launcher.ui.server import create_app, serve_in_thread

    app = create_app(UiSettings(port=0, local_only=True, roots=[tmp_path]))
    with serve_in_thread(app) as url, urllib.request.urlopen(url + "/api/forms") as reply:
        tabs = json.load(reply)["tabs"]
    assert [t["type"] for t in tabs] == list(PIPELINE_TYPES)
    for tab in tabs:
        starter, written = tab["starter"], yaml.safe_load(starter_config(tab["type"]))
        assert (starter["type"], starter["model"]) == (tab["type"], written["model"])
        folder = written["data_loader"]["dataset"]["dataset_dir"]
        assert starter["data_loader"]["dataset"]["dataset_dir"] == str(tmp_path / folder)


def test_start_training_here_refuses_a_missing_dataset_at_its_field(tmp_path: Path) -> None:
    """As `launcher submit --local` does: a missing local dataset is a problem at its field,
    and no run is started (the starter's folder does not exist under the served root)."""
    from launcher.backends.local import LocalBackend
    from launcher.ui.configs import starter_values
    from launcher.ui.runs import Runs
    from launcher.ui.security import UiSettings
    from launcher.ui.submit import start_training

    local = LocalBackend(home=tmp_path / "home")
    result = start_training(
        starter_values("SD_LORA", tmp_path), target="local", sweeps=[], replace=False,
        runs=Runs(local_only=True, local=local), settings=UiSettings(port=0, roots=[tmp_path]),
    )  # fmt: skip
    assert "submitted" not in result and not result["valid"], result
    paths = [p["path"] for p in result["problems"]]
    assert paths == ["data_loader.dataset.dataset_dir"], result["problems"]
    assert "no such folder" in result["problems"][0]["message"]
    assert local.list() == []
