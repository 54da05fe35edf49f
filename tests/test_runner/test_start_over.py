"""`launcher submit --replace` of a finished cluster run: its new workload carries a start-over
token (``$KUBETUNE_START_OVER``); the first pod discards the checkpoints and records the token,
a retried pod of the same workload (same token) resumes instead of starting over again.
Real runs of the tiny SD model on a local store."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from train_support import make_config, step_dirs, train, training_images

from kubetune.layout import START_OVER_ENV, START_OVER_KEY
from kubetune.storage import open_store
from runner.session import start_over

pytest_plugins = ["fixtures_models"]  # tiny_sd_dir
data_dir = training_images(n=2)


def test_a_token_is_pending_until_recorded(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "run"))
    assert not start_over.pending(store, None)  # no token: nothing asked
    assert start_over.pending(store, "t1")
    store.put_bytes(START_OVER_KEY, b"{not json")
    assert start_over.pending(store, "t1")  # a damaged record: not carried out
    start_over.record(store, "t1")
    assert not start_over.pending(store, "t1")  # a retried pod of the same workload
    assert start_over.pending(store, "t2")  # a later --replace
    assert json.loads(store.get_bytes(START_OVER_KEY))["token"] == "t1"


@pytest.mark.slow
def test_the_first_pod_starts_over_and_a_retry_resumes(
    tiny_sd_dir: Path,
    data_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "run"
    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, out, max_train_steps=2,
                      save_every_n_steps=1, max_checkpoints=None)  # fmt: skip
    assert train(cfg).step == 2 and step_dirs(out) == ["step-000001", "step-000002"]
    first = (out / "checkpoints/step-000001/manifest.json").read_bytes()
    monkeypatch.setenv(START_OVER_ENV, "t1")
    caplog.set_level(logging.INFO)
    assert train(cfg).step == 2
    assert "starting over: discarding the run's existing checkpoints" in caplog.text
    assert "start-over t1" in caplog.text and "resumed from checkpoint" not in caplog.text
    assert (out / "checkpoints/step-000001/manifest.json").read_bytes() != first  # made anew
    assert json.loads((out / START_OVER_KEY).read_text())["token"] == "t1"
    caplog.clear()
    assert train(cfg).step == 2  # the same workload's next pod
    assert "resumed from checkpoint step-000002" in caplog.text
    assert "starting over" not in caplog.text
