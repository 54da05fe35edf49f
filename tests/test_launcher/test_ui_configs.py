"""Generate Config is `launcher validate`: the same problems, line for line, for every bad
config the CLI's tests use, and every problem placed at a field path the form knows."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.config_files import validate_file, validate_text
from launcher.ui.configs import _problem

SAMPLES = Path(__file__).parents[1] / "data" / "invoke_training_samples"
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


def test_generate_warns_at_the_fields_of_the_data_paths_validate_refuses() -> None:
    """Generate Config said ok where `launcher validate` of the same config exits 2 (an
    invoke-training sample without its dataset: `... no such file`). Over the UI's HTTP API
    (reload the sample, Generate its values) it now reports validate's data-path lines, as
    warnings placed at their fields: the YAML is still generated (the data may be where the
    run runs; Start Training here refuses it, as `submit --local` does)."""
    import json
    import urllib.request

    from launcher.ui.security import UiSettings
    from launcher.ui.server import create_app, serve_in_thread

    sample = SAMPLES / "sdxl_lora_masks_gnome_1x24gb.yaml"
    by_file = validate_file(str(sample))
    assert not by_file.valid and by_file.errors, by_file
    app = create_app(UiSettings(port=0, local_only=True, roots=[SAMPLES]))
    with serve_in_thread(app) as url:
        with urllib.request.urlopen(url + "/", timeout=30) as reply:
            page = reply.read().decode()
        csrf = page.split('name="kubetune-csrf" content="')[1].split('"')[0]
        headers = {"X-Kubetune-CSRF": csrf, "Content-Type": "application/json"}

        def post(path: str, data: dict) -> dict:
            body = json.dumps(data).encode()
            req = urllib.request.Request(url + path, data=body, headers=headers)
            with urllib.request.urlopen(req, timeout=30) as reply:
                return json.load(reply)

        loaded = post("/api/reference", {"path": str(sample)})
        generated = post("/api/generate", {"values": loaded["values"]})
    assert generated["valid"] and generated["yaml"], generated
    expected = [_problem(line, str(sample)) for line in by_file.errors]
    got = generated["data_warnings"]
    assert [(p["path"], p["message"]) for p in got] == [
        (p["path"], p["message"]) for p in expected
    ], (got, expected)
    assert got[0]["path"] == "data_loader.dataset.jsonl_path" and "no such file" in got[0]["text"]
    for problem in expected:  # the message under the "ok" names each one too
        assert any(problem["text"] in line for line in generated["warnings"]), generated
