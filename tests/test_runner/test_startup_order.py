"""Startup order of ``runner.session.run.run`` (issue #17): the base model loads while the data
preflight runs, the preflight is joined after loading, and the lease and every other write
come after the join — so a bad dataset still fails with nothing written, and its error is
still the one reported when the model cannot load either. No timings: the preflight below
waits (bounded) for the loader to start, and every step records an event."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from train_support import make_config, train, write_dataset

from kubetune.config import PipelineConfig
from kubetune.dataset.preflight import PreflightReport, preflight
from kubetune.errors import DataError
from kubetune.storage.lease import Lease

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(300)
GATE_S = 30.0  # how long the preflight waits for the loader before it reports the wrong order


def _files(root: Path) -> list[str]:
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class GatedPreflight(Future):  # type: ignore[type-arg]
    """The run's preflight (the real one, in a thread) that starts only once the model has
    started loading, and records when the run awaits it and what the run wrote by then."""

    def __init__(self, cfg: PipelineConfig, loading: threading.Event, events: list[str],
                 out: Path) -> None:  # fmt: skip
        super().__init__()
        self.events, self.out = events, out
        self.written_at_join: list[str] | None = None
        threading.Thread(target=self._work, args=(cfg, loading), daemon=True).start()

    def _work(self, cfg: PipelineConfig, loading: threading.Event) -> None:
        if not loading.wait(GATE_S):
            self.set_exception(AssertionError("the preflight was awaited before loading began"))
            return
        try:
            report = preflight(cfg)
        except BaseException as err:  # noqa: BLE001 - handed to the run by .result()
            self.set_exception(err)
            return
        self.events.append("preflight done")
        self.set_result(report)

    def result(self, timeout: float | None = None) -> PreflightReport:
        if self.written_at_join is None:
            self.events.append("join")
            self.written_at_join = _files(self.out)
        return super().result(timeout)


def _record(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> threading.Event:
    """Record model loading (and signal its start) and every lease taken."""
    import runner.session.load

    loading = threading.Event()
    real_load, real_acquire = runner.session.load.load_model, Lease.acquire

    def load(*args: Any, **kwargs: Any) -> Any:
        events.append("load")
        loading.set()
        return real_load(*args, **kwargs)

    def acquire(self: Lease, **kwargs: Any) -> Lease:
        events.append("lease")
        return real_acquire(self, **kwargs)

    monkeypatch.setattr(runner.session.load, "load_model", load)
    monkeypatch.setattr(Lease, "acquire", acquire)
    return loading


def test_model_loads_before_the_preflight_is_awaited_and_writes_follow_the_join(
    tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    cfg = make_config("SD_LORA", tiny_sd_dir, write_dataset(tmp_path / "data", n=2), out,
                      max_train_steps=1, save_every_n_steps=1)  # fmt: skip
    events: list[str] = []
    pending = GatedPreflight(cfg, _record(monkeypatch, events), events, out)
    result = train(cfg, data=pending)
    assert result.step == 1
    assert events == ["load", "join", "preflight done", "lease"] or events == [
        "load", "preflight done", "join", "lease"]  # fmt: skip
    assert pending.written_at_join == []  # no lease, config.yaml or index before the join
    assert {"config.yaml", "data/index.json.gz", "final/manifest.json"} <= set(_files(out))


def test_a_bad_dataset_is_reported_first_even_when_the_model_cannot_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before this change the preflight failed before loading began; a missing model must
    not hide the dataset's error now that loading comes first. Nothing is written."""
    out = tmp_path / "out"
    data = write_dataset(tmp_path / "data", n=2)
    (data / "img-1.png").write_bytes(b"not an image")
    cfg = make_config("SD_LORA", tmp_path / "no-such-model", data, out)
    events: list[str] = []
    _record(monkeypatch, events)
    with pytest.raises(DataError, match=r"img-1\.png: not a readable image"):
        train(cfg)
    assert events == ["load"] and _files(out) == []
