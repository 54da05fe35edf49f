"""A crash during the last step's validation, after that step's checkpoint was published, is
redone when the run resumes, and only it: no step is trained again, then ``final/`` is
published. Before, the resumed run started at the last step, had nothing left to train and
finished (``completed``, ``final/`` published) without the final validation images.

The real runner (``runner.session.run.run`` in this process, ``builtin:tiny-sd``), outputs in a
local folder or on SeaweedFS. The crash is injected by wrapping ``Validator.validate`` so that
its call for the final step raises ``RuntimeError`` once, as an error inside the validation
pipeline (an out-of-memory error on a GPU) would; the resume is a second run of the same
config, what a resubmit or the Job's next pod does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from train_support import make_config, train, write_dataset

from kubetune.layout import PROGRESS_KEY, ProgressRecord, final_manifest_key, validation_key
from kubetune.storage import open_store
from runner.training.validation import Validator

pytestmark = pytest.mark.timeout(600)


def crash_validation_once(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """Make ``Validator.validate`` raise the first time it runs for ``step``; returns the
    steps every call validated (the crashed one included)."""
    original, calls, crashed = Validator.validate, [], []

    def validate(self: Validator, at: int) -> list[str]:
        calls.append(at)
        if at == step and not crashed:
            crashed.append(at)
            raise RuntimeError(f"injected crash in the validation at step {step}")
        return original(self, at)

    monkeypatch.setattr(Validator, "validate", validate)
    return calls


def crash_then_resume(cfg: Any, monkeypatch: pytest.MonkeyPatch, final: int) -> list[int]:
    """Run ``cfg`` (its validation at ``final`` crashes), then run it again; the steps the
    second run validated."""
    calls = crash_validation_once(monkeypatch, final)
    with pytest.raises(RuntimeError, match="injected crash"):
        train(cfg)
    del calls[:]
    result = train(cfg)
    assert result.step == final
    return list(calls)


def _validation(**fields: Any) -> dict[str, Any]:
    return {"validation_prompts": ["a kbtn picture"], "num_validation_images_per_prompt": 1,
            "num_validation_inference_steps": 2, "train_batch_size": 1, **fields}  # fmt: skip


@pytest.mark.slow
def test_the_final_validation_is_redone_on_resume_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoint and validation every 2 steps of 4: the validation at step 4 crashes after
    checkpoint 4 is published; the resumed run validates step 4 (only) and finishes."""
    data, out = write_dataset(tmp_path / "data", n=2), tmp_path / "out"
    fields = _validation(max_train_steps=4, save_every_n_steps=2, validate_every_n_steps=2)
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, out, **fields)
    assert crash_then_resume(cfg, monkeypatch, final=4) == [4]
    assert (out / validation_key(4, "grid.png")).is_file()
    assert (out / validation_key(2, "grid.png")).is_file()
    assert (out / final_manifest_key()).is_file()
    record = ProgressRecord.from_bytes((out / PROGRESS_KEY).read_bytes())
    assert (record.state, record.step, record.resumed_from) == ("completed", 4, 4)


@pytest.mark.slow
def test_the_final_epoch_validation_is_redone_on_resume_on_s3(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_uri: str
) -> None:
    """Outputs on SeaweedFS, cadence in epochs (2 steps an epoch, 2 epochs): the validation
    that ends epoch 2 crashes after its checkpoint; the resumed run knows the checkpoint
    ended an epoch, redoes that validation and finishes."""
    data, uri = write_dataset(tmp_path / "data", n=2), f"{s3_uri}/epochs"
    fields = _validation(max_train_steps=None, max_train_epochs=2, save_every_n_steps=None,
                         save_every_n_epochs=1,
                         validate_every_n_epochs=1)  # fmt: skip
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), data, uri, **fields)
    assert crash_then_resume(cfg, monkeypatch, final=4) == [4]
    store = open_store(uri)
    assert store.exists(validation_key(4, "grid.png")) and store.exists(final_manifest_key())
    assert ProgressRecord.from_bytes(store.get_bytes(PROGRESS_KEY)).state == "completed"


def test_resumed_epoch_is_set_only_at_an_epochs_end() -> None:
    """The data cursor of a checkpoint saved on an epoch's last step stands at the next
    epoch's start: that step completed ``epoch`` epochs (a plain stand-in for the loader:
    only its ``epoch`` and its sampler's ``position`` are read)."""
    from types import SimpleNamespace

    from runner.training.loop import resumed_epoch

    def loader(epoch: int, position: int) -> SimpleNamespace:
        return SimpleNamespace(epoch=epoch, sampler=SimpleNamespace(position=position))

    assert (resumed_epoch(loader(2, 0)), resumed_epoch(loader(2, 1))) == (2, None)
    assert resumed_epoch(loader(0, 0)) is None  # a fresh start completed nothing
