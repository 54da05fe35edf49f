"""One cadence type for checkpoints and validation."""

from __future__ import annotations

from runner.training.cadence import Cadence


def test_steps_take_precedence_and_epochs_count_completed_ones() -> None:
    steps = Cadence(every_n_steps=3, every_n_epochs=1)
    assert [s for s in range(1, 10) if steps.due(s, None)] == [3, 6, 9]
    assert not steps.due(4, 1)  # with a step cadence, epoch ends do not count
    epochs = Cadence(every_n_epochs=2)
    assert [epochs.due(s, e) for s, e in ((3, 1), (6, 2), (7, None), (9, 3), (12, 4))] == [
        False, True, False, False, True]  # fmt: skip
    assert not Cadence().due(10, 10)


def test_checkpointer_and_validator_share_it() -> None:
    from runner.checkpoint.state import CheckpointSettings
    from runner.training.validation import ValidationSettings

    assert CheckpointSettings.__dataclass_fields__["cadence"].type in ("Cadence", Cadence)
    assert ValidationSettings.__dataclass_fields__["cadence"].type in ("Cadence", Cadence)
