"""``Cadence``: when a periodic action is due (checkpoints and validation use the same one)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Cadence:
    """Every N optimizer steps, or else every N completed epochs (never if neither is set)."""

    every_n_steps: int | None = None
    every_n_epochs: int | None = None

    def due(self, step: int, completed_epoch: int | None) -> bool:
        """Whether the action is due after ``step``; ``completed_epoch`` is set only on the
        last step of an epoch (the number of epochs completed)."""
        if self.every_n_steps:
            return step % self.every_n_steps == 0
        if completed_epoch and self.every_n_epochs:
            return completed_epoch % self.every_n_epochs == 0
        return False
