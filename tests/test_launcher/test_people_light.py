"""`launcher report` / `pull` / sweeps stay torch-free, and their bad-input paths exit 2.
The run folder here is written with the runner's own manifest code (no training needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from kubetune.checkpoint.manifest import Manifest, file_entry
from kubetune.layout import final_manifest_key, utc_now
from launcher.cli.main import main

HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "PIL")


def make_run(root: Path) -> Path:
    final = root / "final"
    final.mkdir(parents=True)
    (final / "lora.safetensors").write_bytes(b"weights" * 100)
    entries = (file_entry(final, "lora.safetensors"),)
    (root / final_manifest_key()).write_bytes(
        Manifest(7, utc_now(), entries, {"weights": ["lora.safetensors"]}).to_bytes()
    )
    (root / "report.html").write_text("<!DOCTYPE html><title>r</title>")
    return root


def test_report_and_pull_do_not_import_torch(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    code = (
        "import sys\nfrom click.testing import CliRunner\nfrom launcher.cli.main import main\n"
        f"r = CliRunner().invoke(main, ['report', {str(run)!r}])\nassert r.exit_code == 0\n"
        f"r = CliRunner().invoke(main, ['pull', {str(run)!r}, '-o', {str(tmp_path / 'o')!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "import launcher.sweeps, launcher.sweep_runs, runner.reporting.run_events\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "o" / "lora.safetensors").read_bytes() == b"weights" * 100


def test_report_prints_the_path_and_json(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    text = CliRunner().invoke(main, ["report", str(run)])
    assert text.exit_code == 0 and text.output.strip() == str(run / "report.html")
    doc = json.loads(CliRunner().invoke(main, ["report", str(run), "--format", "json"]).output)
    assert doc["report"] == str(run / "report.html")


def test_bad_inputs_exit_2_with_one_line(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    cases = [
        (["pull", str(run), "--step", "3", "--final"], "--step and --final exclude each other"),
        (["pull", str(run), "-o", "json"], "for a json report use --format json"),
        (
            ["pull", str(run), "--step", "3", "-o", str(tmp_path / "x")],
            "complete checkpoints: none",
        ),
        (["report", str(tmp_path)], "does not exist yet"),
        (["pull", "no-such-run", "--local"], "no local run"),
    ]
    for args, words in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert words in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_layout_keys_for_people() -> None:
    from kubetune import layout
    from runner.checkpoint import state as checkpointer

    assert layout.thumb_key(40, 1) == "validation/step-000040/thumb-1.jpg"
    assert layout.parse_thumb_key(layout.thumb_key(1_234_567, 12)) == (1_234_567, 12)
    for other in (
        "validation/step-000040/grid.png",
        "validation/step-40/thumb-1.jpg",
        "checkpoints/step-000040/thumb-1.jpg",
        "validation/step-000040/thumb-x.jpg",
    ):
        assert layout.parse_thumb_key(other) is None  # fmt: skip
    assert layout.final_manifest_key() == "final/manifest.json"
    written = {checkpointer.STATE_FILE, checkpointer.WEIGHTS_FILE, checkpointer.INFO_FILE}
    assert written == layout.TRAINING_STATE_FILES  # the pull fallback skips exactly these


def test_pull_counts_one_file_as_one_file(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["pull", str(run), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert "pulled 1 file (0.0 MB) of final step 7 into " in result.output


def test_pull_names_where_the_files_went_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`launcher pull quickstart` said `into quickstart-final/` (and JSON `dest` the same):
    relative to a folder the message does not name, and not clickable in a terminal."""
    run = make_run(tmp_path / "run")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    text = CliRunner().invoke(main, ["pull", str(run)])
    assert text.exit_code == 0, text.output
    assert f" into {here / 'run-final'}/\n" in text.output
    doc = json.loads(CliRunner().invoke(main, ["pull", str(run), "--format", "json"]).output)
    assert doc["dest"] == str(here / "run-final")
    relative = CliRunner().invoke(main, ["pull", str(run), "-o", "lora"])
    assert f" into {here / 'lora'}/\n" in relative.output


def test_pull_of_a_failed_run_says_it_failed_not_that_it_has_not_finished(
    tmp_path: Path,
) -> None:
    from kubetune.layout import PROGRESS_KEY, ProgressRecord
    from kubetune.storage import open_store
    from kubetune.storage.lease import Lease, LeaseSettings

    run = tmp_path / "run"
    run.mkdir()
    (run / PROGRESS_KEY).write_bytes(ProgressRecord(state="failed", step=3).to_bytes())
    result = CliRunner().invoke(main, ["pull", str(run), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "the run failed at step 3" in result.output, result.output
    assert "has not finished" not in result.output
    crashed = ProgressRecord(state="failed", step=3, error="CUDA error: boom", exit_code=1)
    (run / PROGRESS_KEY).write_bytes(crashed.to_bytes())
    output = CliRunner().invoke(main, ["pull", str(run)]).output
    assert "the run failed at step 3: CUDA error: boom (exit code 1)" in output, output
    (run / PROGRESS_KEY).write_bytes(ProgressRecord(state="running", step=3).to_bytes())
    with Lease(open_store(str(run)), LeaseSettings(timeout_s=600), holder="pod/1"):  # live
        assert "has not finished" in CliRunner().invoke(main, ["pull", str(run)]).output
    # released, no end written: not running (tests/test_launcher/test_stale_run.py)
    output = CliRunner().invoke(main, ["pull", str(run)]).output
    assert "the run is not running: last record at step 3" in output, output


def test_report_of_a_local_run_writes_the_copy_o_names(tmp_path: Path) -> None:
    """`-o` is always a file to write: for a local run `report -o FILE` printed the run's
    own report.html and wrote nothing. The copy's links to the run's files point into the
    run folder, so they work from wherever the copy goes."""
    run = make_run(tmp_path / "run")
    link = '<a href="validation/step-000007/grid.png">grid</a>'
    (run / "report.html").write_text(f"<!DOCTYPE html><title>r</title>{link}")
    copy = tmp_path / "shared" / "my-report.html"
    result = CliRunner().invoke(main, ["report", str(run), "-o", str(copy)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == str(copy)
    page = copy.read_text()
    assert f'href="{(run / "validation/step-000007/grid.png").as_uri()}"' in page
    assert (run / "report.html").read_text().endswith(link)  # the run's own page is unchanged


def test_an_o_path_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    """`-o` under a file (or in a folder that cannot be made) printed a Python traceback
    ending in FileNotFoundError / NotADirectoryError from init, schema, report and pull."""
    run = make_run(tmp_path / "run")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [
        ["init", "--type", "SD_LORA", "-o", str(blocker / "lora.yaml")],
        ["schema", "-o", str(blocker / "schema.json")],
        ["report", str(run), "-o", str(blocker / "report.html")],
        ["pull", str(run), "-o", str(blocker / "weights")],
    ]
    for args in cases:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1, (args, result.output, result.exception)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {blocker}"), (args, lines)
        assert "Not a directory" in lines[0] or "a file, where a folder is needed" in lines[0]
