"""A missing model path and a missing JSONL dataset file say how to fix them, as a missing
dataset folder already did ("put your images there, or point the field at their folder"):
the two lines a newcomer meets first with an invoke-training sample config (its JSONL is a
download away) or a mistyped model folder."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from launcher.cli.main import main


def _validate(tmp_path: Path, **fields: object) -> tuple[int, str]:
    data = {
        "type": "SD_LORA",
        "base_output_dir": "out",
        "model": "runwayml/stable-diffusion-v1-5",
        "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER",
            "dataset": {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": "data/meta.jsonl"},
        },
        "max_train_steps": 10,
        "save_every_n_steps": 10,
        **fields,
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    result = CliRunner().invoke(main, ["validate", str(path)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return result.exit_code, "\n".join(errors)


def test_a_missing_jsonl_file_says_what_to_do(tmp_path: Path) -> None:
    code, err = _validate(tmp_path)
    assert code == 2 and len(err.splitlines()) == 1, err
    missing = tmp_path / "data" / "meta.jsonl"
    assert f"data_loader.dataset.jsonl_path: {missing}: no such file" in err, err
    assert "put the dataset's JSONL file there, or point the field at it" in err, err


def test_a_missing_model_path_says_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"never decoded by validate")
    (tmp_path / "data" / "meta.jsonl").write_text('{"image": "a.png", "text": "a cat"}\n')
    for value in (str(tmp_path / "models" / "sd15"), "sd15.safetensors"):
        code, err = _validate(tmp_path, model=value)
        assert code == 2 and len(err.splitlines()) == 1, err
        assert "model: " in err and "no such file or folder" in err, err
        assert "(point it at a diffusers folder, a weights file or a Hub name (org/name))" in err
