"""``precision_warnings``: the weight_dtype / mixed_precision pairs that train without loss
scaling or slower than the matching pair, and the ones that need no advice."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from train_support import make_config, write_dataset

from kubetune.config.advice import precision_warnings
from launcher.cli.main import main


def _cfg(kind: str = "SD_LORA", **fields: str) -> object:
    return make_config(kind, Path("model"), Path("data"), Path("out"), **fields)


def test_float16_weights_without_fp16_autocast_warn_of_no_loss_scaling() -> None:
    for mixed in ("no", "bf16"):
        (line,) = precision_warnings(_cfg(weight_dtype="float16", mixed_precision=mixed))
        assert "loss scaling" in line and "mixed_precision: fp16" in line
    assert precision_warnings(_cfg(weight_dtype="float16", mixed_precision="fp16")) == []


def test_bfloat16_weights_without_autocast_warn_for_lora_types_only() -> None:
    (line,) = precision_warnings(_cfg(weight_dtype="bfloat16", mixed_precision="no"))
    assert "mixed_precision: bf16" in line
    assert precision_warnings(_cfg(weight_dtype="bfloat16", mixed_precision="bf16")) == []
    assert precision_warnings(_cfg(weight_dtype="float32", mixed_precision="no")) == []
    ti = _cfg("SD_TEXTUAL_INVERSION", weight_dtype="bfloat16", mixed_precision="no")
    assert precision_warnings(ti) == []


def test_launcher_validate_prints_the_advice(tmp_path: Path) -> None:
    from kubetune.config import config_to_yaml

    path = tmp_path / "c.yaml"
    data = write_dataset(tmp_path / "data", n=1)  # validate checks that a local dataset exists
    cfg = make_config("SD_LORA", Path("org/model"), data, tmp_path / "out",  # a Hub name:
                      weight_dtype="float16", mixed_precision="no")  # fmt: skip
    path.write_text(config_to_yaml(cfg))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0
    assert f"warning: {path}: weight_dtype: float16 with mixed_precision: no" in result.output


def test_every_sample_config_gets_advice_without_error() -> None:
    """Types without the pair (FLUX_LORA has no mixed_precision) get none."""
    from kubetune.config import load_config

    samples = sorted((Path(__file__).parents[1] / "data").rglob("*.yaml"))
    checked = 0
    for path in samples:
        try:
            cfg = load_config(str(path))
        except Exception:  # the bad-config corpus
            continue
        assert all(isinstance(line, str) for line in precision_warnings(cfg))
        checked += 1
    assert checked >= 5


def test_the_advice_says_when_the_pair_is_the_defaults() -> None:
    """A config that sets neither field gets the warning too (the schema's defaults are
    invoke-training's): it says these are the defaults, not something the person wrote."""
    from kubetune.config import parse_config

    text = (
        "type: SD_LORA\nbase_output_dir: o\nmax_train_steps: 2\nsave_every_n_steps: 1\n"
        "data_loader:\n  dataset:\n    type: IMAGE_CAPTION_DIR_DATASET\n    dataset_dir: d\n"
    )
    (line,) = precision_warnings(parse_config(text))
    assert line.startswith("weight_dtype: bfloat16 with mixed_precision: no (the defaults) "), line
    (line,) = precision_warnings(parse_config(text + "weight_dtype: bfloat16\n"))
    assert "(the defaults)" not in line
