"""`launcher validate` checks a config's local datasets without reading an image (issue #27
item 4): the folder / JSONL exists, captions are there, every JSONL line parses and names
files that exist; every error is `file:line: field.path: ...`; `submit --local` refuses a
config whose dataset is missing (exit 2) before anything starts. The image files here are
not images at all: nothing decodes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from launcher.cli.main import main


def _config(folder: Path, dataset: dict, **extra: object) -> Path:
    data = {
        "type": "SD_LORA",
        "base_output_dir": "out/r",
        "model": "builtin:tiny-sd",
        "data_loader": {"type": "IMAGE_CAPTION_SD_DATA_LOADER", "dataset": dataset},
        "max_train_steps": 2,
        "save_every_n_steps": 2,
        **extra,
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _validate(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["validate", *args])
    return result.exit_code, result.stdout, result.stderr


def _runner_refuses_before_torch(path: Path) -> str:
    """``python -m runner``'s ``main([path])`` in a fresh process: it returns 2 without having
    imported torch. Its stderr."""
    code = ("import sys\nfrom runner.__main__ import main\n"
            f"rc = main([{str(path)!r}])\nprint(rc, 'torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert out.stdout.split() == ["2", "False"], out.stdout + out.stderr
    return out.stderr


def _images(folder: Path, names: list[str], captions: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"not an image: never read by validate")
        if captions:
            (folder / name).with_suffix(".txt").write_text("a caption")


def test_a_missing_folder_is_an_error_with_its_line(tmp_path: Path) -> None:
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "nope"})
    code, _, err = _validate(str(path))
    assert code == 2
    assert f"{path}:8: data_loader.dataset.dataset_dir: {tmp_path / 'nope'}: no such folder" in err


def test_with_storage_a_missing_local_path_is_a_warning(tmp_path: Path) -> None:
    storage = {"bucket": "bucket", "endpoint_url": "http://127.0.0.1:9"}
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "/in/the/image"},
                   storage=storage, job={"name": "r"})  # fmt: skip
    code, _, err = _validate(str(path))
    assert code == 0 and "warning:" in err and "fine if the pod's image has it" in err


def test_captions_and_jsonl_lines_are_checked(tmp_path: Path) -> None:
    _images(tmp_path / "data", ["a.png", "b.png"])
    (tmp_path / "data" / "b.txt").unlink()
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"})
    code, _, err = _validate(str(path))
    assert (
        code == 2 and "data_loader.dataset.dataset_dir:" in err and "no caption file b.txt" in err
    )
    lines = [json.dumps({"image": "data/a.png", "text": "a"}), "{not json",
             json.dumps({"image": "data/gone.png", "text": "c"})]  # fmt: skip
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    jsonl = {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": "train.jsonl"}
    code, _, err = _validate(str(_config(tmp_path, jsonl)))
    assert (
        code == 2
        and f"data_loader.dataset.jsonl_path: {tmp_path / 'train.jsonl'}:2: not valid JSON" in err
    )
    (tmp_path / "train.jsonl").write_text("\n".join([lines[0], lines[2]]) + "\n")
    code, _, err = _validate(str(_config(tmp_path, jsonl)))
    assert code == 2 and "gone.png: file not found" in err
    (tmp_path / "train.jsonl").write_text(lines[0] + "\n")
    code, out, err = _validate(str(_config(tmp_path, jsonl)))
    assert code == 0 and out.startswith("ok: "), err


def test_unknown_types_name_the_type_key(tmp_path: Path) -> None:
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIRR_DATASET", "dataset_dir": "d"})
    code, _, err = _validate(str(path))
    assert code == 2 and f"{path}:7: data_loader.dataset.type: 'IMAGE_CAPTION_DIRR" in err
    data = yaml.safe_load(path.read_text())
    data["data_loader"]["type"] = "NOPE"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    code, _, err = _validate(str(path))
    assert code == 2 and f"{path}:5: data_loader.type: 'NOPE' is not valid here" in err


def test_validate_data_errors_name_file_line_and_field(tmp_path: Path) -> None:
    _images(tmp_path / "data", ["a.png"])
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"})
    code, _, err = _validate("--data", str(path))
    assert code == 2
    first = next(line for line in err.splitlines() if line.startswith("error:"))
    assert first.startswith(f"error: {path}:6: data_loader.dataset: "), err


def test_submit_local_refuses_a_missing_dataset_before_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    path = _config(tmp_path / "cfg", {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "x"})
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--local", os.path.relpath(path)])
    assert result.exit_code == 2, result.output
    assert "data_loader.dataset.dataset_dir:" in result.output and "no such folder" in result.output
    assert not (tmp_path / "home" / "runs").exists()


def test_the_runner_refuses_a_missing_dataset_before_loading_torch(tmp_path: Path) -> None:
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "gone"})
    stderr = _runner_refuses_before_torch(path)
    assert f"{path}:8: data_loader.dataset.dataset_dir: {tmp_path / 'gone'}: no such folder" in (
        stderr
    )


def test_validate_data_names_the_field_of_a_missing_dataset_bucket(
    tmp_path: Path, s3_env: object
) -> None:
    """`--data` reads an s3:// dataset (SeaweedFS here): a bucket that does not exist is one
    line at `data_loader.dataset.dataset_dir`, whose fix is the dataset's, not the outputs'."""
    config = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"
    uri = "s3://no-such-bucket-kt/imgs"
    args = ["validate", "--data", str(config), "--set", f"data_loader.dataset.dataset_dir={uri}"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.splitlines()
    assert ": data_loader.dataset.dataset_dir: bucket 'no-such-bucket-kt' does not exist" in line
    assert "output URI" not in line


def test_the_runner_refuses_a_missing_model_path_before_loading_torch(tmp_path: Path) -> None:
    """`python -m runner` with `model: models/sd15/v1` (no such folder, not a Hub name) failed
    only after the libraries loaded, with no file, line or field."""
    _images(tmp_path / "data", ["a.png"])
    path = _config(tmp_path, {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "data"},
                   model="models/sd15/v1")  # fmt: skip
    stderr = _runner_refuses_before_torch(path)
    assert f"{path}:3: model: models/sd15/v1: no such file or folder beside the config" in stderr


def test_a_dataset_found_from_the_working_folder_is_named_in_the_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """invoke-training's samples say `dataset_dir: sample_data/bruce_the_gnome`, meant from
    its repository's root; kubetune reads it beside the config file (its sample_configs/
    folder) and said only `no such folder`. The folder the person meant is named now."""
    repo = tmp_path / "invoke-training"
    _images(repo / "sample_data" / "gnome", ["a.png"])
    _config(repo / "configs", {"type": "IMAGE_CAPTION_DIR_DATASET",
                               "dataset_dir": "sample_data/gnome"})  # fmt: skip
    monkeypatch.chdir(repo)
    code, _, err = _validate("configs/run.yaml")
    meant = repo / "sample_data" / "gnome"
    assert code == 2 and f"{repo / 'configs' / 'sample_data' / 'gnome'}: no such folder" in err
    assert f"{meant} exists" in err and "relative to the config file's folder" in err
    runner = subprocess.run([sys.executable, "-m", "runner", "configs/run.yaml"], cwd=repo,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert runner.returncode == 2 and f"{meant} exists" in runner.stderr
