"""Images that pass the header-only preflight but do not decode: skipped and counted during
training, the run stopped (exit 2, with the list) past `max_bad_image_share`, and found up
front by `launcher validate --data`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from data_fixtures import lora_config, upload_tree, write_image_dir
from s3server import S3Server

from kubetune.config import config_to_yaml
from kubetune.errors import EXIT_USER_ERROR, DataError
from kubetune.layout import ProgressRecord
from launcher.cli.main import main
from runner.data import build_train_dataloader, preflight

pytestmark = pytest.mark.timeout(120)


def _dataset(root: Path, n: int = 6, corrupt: tuple[int, ...] = (2,)) -> Path:
    """`n` 48x48 PNGs with captions; the `corrupt` ones keep their header but lose their
    pixel data (IDAT cut), so only a full decode notices."""
    write_image_dir(root, [(48, 48)] * n)
    for i in corrupt:
        path = root / f"img-{i:03d}.png"
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    return root


def _cfg(root: Path | str, **loader: object) -> object:
    return lora_config({"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(root)}, **loader)


def _epoch(cfg: object, batch_size: int = 2) -> tuple[list[dict], object]:
    loader = build_train_dataloader(cfg, seed=1, batch_size=batch_size, device_is_cuda=False)
    return list(loader), loader


def test_preflight_passes_a_body_it_does_not_read(tmp_path: Path) -> None:
    report = preflight(_cfg(_dataset(tmp_path / "d")))
    assert report.num_examples == 6


def test_corrupt_body_is_skipped_and_counted(tmp_path: Path) -> None:
    cfg = _cfg(_dataset(tmp_path / "d"), max_bad_image_share=0.2)
    batches, loader = _epoch(cfg)
    ids = [i for b in batches for i in b["id"]]
    assert sorted(ids) == [f"img-{i:03d}.png" for i in (0, 1, 3, 4, 5)]
    assert all(len(b["id"]) >= 1 and "skipped" not in b for b in batches)
    assert len(loader.bad) == 1 and "img-002.png" in next(iter(loader.bad))


def test_a_batch_of_only_bad_examples_takes_a_good_one(tmp_path: Path) -> None:
    cfg = _cfg(_dataset(tmp_path / "d", n=4, corrupt=(1,)), max_bad_image_share=0.25)
    batches, loader = _epoch(cfg, batch_size=1)
    assert len(batches) == 4 and all(len(b["id"]) == 1 for b in batches)
    assert "img-001.png" not in [i for b in batches for i in b["id"]]
    assert len(loader.bad) == 1


def test_more_bad_than_the_share_stops_with_the_list(tmp_path: Path) -> None:
    cfg = _cfg(_dataset(tmp_path / "d", corrupt=(1, 4)), max_bad_image_share=0.2)
    with pytest.raises(DataError) as err:
        _epoch(cfg)
    message = str(err.value)
    assert err.value.exit_code == EXIT_USER_ERROR
    assert "max_bad_image_share: 2 of 6 examples" in message and "1 allowed" in message
    assert "img-001.png" in message and "img-004.png" in message
    assert "\n" not in message


def test_default_share_stops_at_the_first_bad_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"1 of 6 examples are unreadable.*img-002\.png"):
        _epoch(_cfg(_dataset(tmp_path / "d")))


def _config_file(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(config_to_yaml(_cfg(data)))
    return path


def test_validate_data_decodes_everything(tmp_path: Path) -> None:
    good = _config_file(tmp_path, _dataset(tmp_path / "good", corrupt=()))
    result = CliRunner().invoke(main, ["validate", "--data", str(good)])
    assert result.exit_code == 0, result.output
    assert "data: 6 examples decode" in result.stdout

    bad = _config_file(tmp_path, _dataset(tmp_path / "bad", corrupt=(0, 5)))
    result = CliRunner().invoke(main, ["validate", "--data", "--format", "json", str(bad)])
    assert result.exit_code == 2
    errors = json.loads(result.stdout)["results"][0]["errors"]
    assert len(errors) == 2  # the list: one line per bad example
    assert "img-000.png: cannot decode" in errors[0] and "img-005.png: cannot decode" in errors[1]
    line = next(i for i, t in enumerate(bad.read_text().splitlines(), 1) if t == "  dataset:")
    where = f"{bad}:{line}: data_loader.dataset: "
    assert all(e.startswith(where) and "\n" not in e for e in errors), errors


def test_validate_data_lists_every_bad_example_from_s3(
    tmp_path: Path, s3_env: S3Server, s3_bucket: str
) -> None:
    """From a laptop against S3 (credentials from the environment): a progress bar on stderr,
    every bad image named on its own line (bodies cut after the header, and one whose header
    is garbage), exit 2."""
    data = _dataset(tmp_path / "d", corrupt=(1, 3, 4))
    (data / "img-005.png").write_bytes(b"garbage, not a PNG")
    upload_tree(s3_env.client(), s3_bucket, "ds", data)
    path = tmp_path / "cfg.yaml"
    path.write_text(config_to_yaml(_cfg(f"s3://{s3_bucket}/ds")))  # type: ignore[arg-type]
    result = CliRunner().invoke(main, ["validate", "--data", str(path)])
    assert result.exit_code == EXIT_USER_ERROR, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    names = ("img-001.png", "img-003.png", "img-004.png", "img-005.png")
    named = [n for n in names for line in lines if n in line]
    assert len(lines) == 4 and len(named) == 4, result.stderr
    assert all(f"s3://{s3_bucket}/ds/" in line for line in lines)
    assert "decoding" in result.stderr  # the progress bar
    assert result.stdout == ""


def test_validate_help_explains_data() -> None:
    text = " ".join(CliRunner().invoke(main, ["validate", "--help"]).output.split())
    assert "--data" in text and "decode every example" in text and "s3://" in text
    assert "progress bar" in text and "listed, one error line each (exit 2)" in text


def test_validate_data_imports_no_torch(tmp_path: Path) -> None:
    cfg = _config_file(tmp_path, _dataset(tmp_path / "d", corrupt=()))
    code = (
        "import sys\nfrom click.testing import CliRunner\nimport launcher.cli.main\n"
        f"r = CliRunner().invoke(launcher.cli.main.main, ['validate', '--data', {str(cfg)!r}])\n"
        "print(r.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_run_stops_with_exit_2_and_progress_lists_them(tmp_path: Path, tiny_sd_dir: Path) -> None:
    from train_support import make_config, train

    data = _dataset(tmp_path / "d", n=4, corrupt=(3,))
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=6)
    with pytest.raises(DataError, match=r"img-003\.png"):
        train(cfg)
    record = ProgressRecord.from_bytes((out / "progress.json").read_bytes())
    assert "1 unreadable image skipped" in record.summary()  # the `launcher status` line
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "failed" and progress["bad_images"] == 1
    assert "img-003.png" in progress["bad_image_examples"][0]
    assert yaml.safe_load((out / "config.yaml").read_text())["type"] == "SD_LORA"


def test_a_run_within_the_share_finishes_and_progress_counts_them(
    tmp_path: Path, tiny_sd_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One bad image of four with a share of 0.25: skipped with a warning naming it, counted
    in progress.json, and the run completes."""
    from train_support import make_config, train

    data = _dataset(tmp_path / "d", n=4, corrupt=(1,))
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=4)
    loader = {**cfg.data_loader.model_dump(), "max_bad_image_share": 0.25}
    cfg = type(cfg).model_validate({**cfg.model_dump(), "data_loader": loader})
    with caplog.at_level("WARNING", logger="runner.data.train_dataset"):
        train(cfg)
    assert any("img-001.png" in r.getMessage() for r in caplog.records)
    progress = json.loads((out / "progress.json").read_text())
    assert progress["state"] == "completed" and progress["step"] == 4
    assert progress["bad_images"] == 1 and "img-001.png" in progress["bad_image_examples"][0]


@pytest.mark.slow
def test_a_resumed_run_keeps_counting_the_examples_skipped_before(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    """The skipped examples are part of the checkpoint: a restarted pod continues the count
    (and `progress.json` keeps naming them) instead of starting from zero."""
    from train_support import make_config, train

    data = _dataset(tmp_path / "d", n=8, corrupt=(1,))
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=4)  # one epoch
    loader = {**cfg.data_loader.model_dump(), "max_bad_image_share": 0.25}
    cfg = type(cfg).model_validate({**cfg.model_dump(), "data_loader": loader})
    train(cfg)
    assert json.loads((out / "progress.json").read_text())["bad_images"] == 1
    more = type(cfg).model_validate({**cfg.model_dump(), "max_train_steps": 5})
    train(more)  # resumes at step 4; its one step may not draw the bad image again
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step"] == 5 and progress["bad_images"] == 1
    assert "img-001.png" in progress["bad_image_examples"][0]
