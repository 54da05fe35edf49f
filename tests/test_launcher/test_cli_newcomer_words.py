"""The words a newcomer meets when a command has nothing to show or is given something wrong:
one line that names what is wrong and what to do instead, exit 2 for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from launcher.cli.main import main


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No kubeconfig and an empty kubetune home: a newcomer's machine."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, (args, result.output)
    lines = [x for x in result.output.strip().splitlines() if not x.startswith("warning: ")]
    assert len(lines) == 1, (args, result.output)
    return lines[0]


def test_list_with_no_runs_says_how_to_start_one(no_cluster: Path) -> None:
    result = CliRunner().invoke(main, ["list"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # no table of nothing
    assert "no runs on this machine yet; `launcher submit --local CONFIG` starts one" in (
        result.stderr
    )
    assert CliRunner().invoke(main, ["list", "--format", "json"]).stdout.strip() == "[]"


def test_status_without_a_run_points_at_list(no_cluster: Path) -> None:
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 2
    assert "name a RUN or --sweep NAME (`launcher list` shows the runs)" in result.output


@pytest.mark.parametrize("command", ["report", "pull"])
def test_a_path_that_is_not_there_is_named_as_a_path(command: str, no_cluster: Path) -> None:
    """`./out/my-run` is an output folder the person mistyped, not a run name."""
    line = _one_line_error([command, "./out/my-run"])
    assert line.startswith("error: ./out/my-run: no such folder"), line
    assert "no local run" not in line


def test_validate_of_a_folder_says_it_is_a_folder(no_cluster: Path) -> None:
    (no_cluster / "configs").mkdir()
    line = _one_line_error(["validate", "configs"])
    assert line.startswith("error: configs: a folder, not a config file"), line


def test_a_dataset_without_its_type_lists_the_types(no_cluster: Path) -> None:
    (no_cluster / "c.yaml").write_text(
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 10\n"
        "data_loader:\n  dataset:\n    dataset_dir: x\n"
    )
    line = _one_line_error(["validate", "c.yaml"])
    expected = "error: c.yaml:5: data_loader.dataset: missing its `type` key; set it to one of "
    assert line.startswith(expected), line
    assert "IMAGE_CAPTION_DIR_DATASET" in line and "IMAGE_CAPTION_JSONL_DATASET" in line


def test_a_missing_dataset_folder_says_what_to_do(no_cluster: Path) -> None:
    (no_cluster / "c.yaml").write_text(
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 10\nsave_every_n_steps: 5\n"
        "data_loader:\n  dataset:\n    type: IMAGE_CAPTION_DIR_DATASET\n    dataset_dir: photos\n"
    )
    line = _one_line_error(["validate", "c.yaml"])
    assert line.startswith("error: c.yaml:8: data_loader.dataset.dataset_dir: "), line
    assert line.endswith("photos: no such folder (put your images there, or point the field "
                         "at their folder)"), line  # fmt: skip


def test_init_lists_the_types_as_configs_spell_them() -> None:
    help_text = CliRunner().invoke(main, ["init", "--help"]).output
    assert "[SD_LORA|SD_TEXTUAL_INVERSION|SDXL_LORA|" in help_text.replace("\n", "")
    wrong = CliRunner().invoke(main, ["init", "--type", "sdxl_lroa"])
    assert wrong.exit_code == 2
    assert "'sdxl_lroa' is not a pipeline type; did you mean SDXL_LORA?" in wrong.output
    assert CliRunner().invoke(main, ["init", "--type", "sdxl_lora"]).exit_code == 0


def test_cancel_of_an_ended_run_says_there_is_nothing_to_cancel(no_cluster: Path) -> None:
    from ui_support import fake_local_run

    fake_local_run(no_cluster / "home", no_cluster / "out", "finished")
    result = CliRunner().invoke(main, ["cancel", "finished"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("finished: Succeeded")
    assert "already ended: nothing to cancel" in result.output


def test_pull_without_a_terminal_prints_no_progress_label(tmp_path: Path) -> None:
    """A bar only at a terminal: in a pipe or a CI log, a bare "pulling" line says nothing."""
    from test_people_light import make_run

    run = make_run(tmp_path / "run")
    result = CliRunner().invoke(main, ["pull", str(run), "-o", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and result.stdout.startswith("pulled 1 file")


@pytest.mark.parametrize("command", ["logs", "cancel"])  # status takes a folder or URI too
def test_a_path_where_a_run_name_goes_says_so(command: str, no_cluster: Path) -> None:
    (no_cluster / "runs" / "quickstart").mkdir(parents=True)
    line = _one_line_error([command, "runs/quickstart"])
    assert line.startswith("error: 'runs/quickstart' is a path, not a run name"), line
    assert "`launcher list` shows them" in line


def test_a_bad_sweep_value_is_named_as_the_sweep(no_cluster: Path) -> None:
    quickstart = Path(__file__).parents[2] / "examples" / "quickstart.yaml"
    result = CliRunner().invoke(
        main, ["submit", "--local", str(quickstart), "--sweep", "lora_rank_dim=4,-1"]
    )
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: --sweep lora_rank_dim=-1: lora_rank_dim: "), (
        result.output
    )
    assert not (no_cluster / "home" / "runs").exists()  # nothing submitted
