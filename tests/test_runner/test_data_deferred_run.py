"""A whole run whose dataset's header checks go on beside training (a large dataset without
aspect-ratio buckets; the threshold is lowered so that four images count as large): a good
dataset trains and its index is stored once checked; a bad image fails the run with the
preflight's one-line DataError naming the file (exit 2), after the run has started, whether
the checks end first or the loader meets the image first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from train_support import make_config, train, write_dataset

import kubetune.dataset.preflight as checks
from kubetune.dataset.preflight import preflight
from kubetune.errors import DataError
from kubetune.layout import CONFIG_KEY, DATA_INDEX_KEY

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(300)


STREAMING = {"target_resolution": 64, "start_dim": 32, "end_dim": 128, "divisible_by": 32}


@pytest.mark.parametrize("order", ["unbucketed", pytest.param("streaming", marks=pytest.mark.slow)])
@pytest.mark.parametrize("bad", [False, True], ids=["good", "bad-image"])
def test_a_run_with_checks_beside_training(
    tmp_path: Path, tiny_sd_dir: Path, monkeypatch: pytest.MonkeyPatch, bad: bool, order: str
) -> None:
    """``streaming``: aspect-ratio buckets in the streaming order, whose sizes arrive from
    the checks as training runs."""
    monkeypatch.setattr(checks, "DEFERRED_CHECKS_MIN_EXAMPLES", 2)
    data = write_dataset(tmp_path / "data", n=4)
    if bad:
        (data / "img-2.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=2)
    if order == "streaming":
        loader = cfg.data_loader.model_dump() | {
            "aspect_ratio_buckets": {**STREAMING, "order": "streaming"}
        }
        cfg = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=2, data_loader=loader)
    if not bad:
        train(cfg)
        assert (out / DATA_INDEX_KEY).is_file()
        return
    with pytest.raises(DataError) as eager:
        preflight(cfg)
    with pytest.raises(DataError, match="img-2.png") as err:
        train(cfg)
    assert str(err.value) == str(eager.value) and err.value.exit_code == 2
    assert (out / CONFIG_KEY).is_file()  # the run had started: the checks ran beside it
    assert not (out / DATA_INDEX_KEY).exists()
