"""Checkpoint cadence and content: what a step folder holds and how a run resumes from one.

A folder ``checkpoints/step-XXXXXX/`` holds the user-facing outputs (LoRA / embeddings; a
fine-tune's diffusers ``unet/``), ``trainable.safetensors`` (the exact trained weights:
float32, or a full fine-tune's UNet in its training dtype; streamed one tensor at a time),
``training_state.pt`` (optimizer, LR scheduler, grad scaler, RNG states, the step, the data
cursor) and ``run_info.json`` (the config fields a resumed run must share). Uploading,
manifests and pruning belong to ``kubetune.checkpoint.publish.CheckpointManager``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kubetune.errors import ResumeMismatchError
from kubetune.layout import CHECKPOINTS, step_name
from runner.pipelines.base import TrainingPipeline
from runner.training.cadence import Cadence

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.checkpoint.publish import CheckpointManager
    from kubetune.layout import SetAsideCheckpoint

log = logging.getLogger(__name__)
STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "trainable.safetensors"
INFO_FILE = "run_info.json"
COMPAT_FIELDS = (
    "type",
    "model",
    "lora_rank_dim",
    "unet_lora_target_modules",
    "text_encoder_lora_target_modules",
    "train_unet",
    "train_text_encoder",
    "train_ti",
    "num_vectors",
    "placeholder_token",
    "use_dora",
    "flux_lora_target_modules",
    "train_transformer",
)
COMPAT_DEFAULTS: dict[str, Any] = {"use_dora": False, "ema": False}
"""What a checkpoint written before a compat field existed implies for it."""
UNRECORDED_OK = frozenset({"optimizer"})
"""Compat fields a checkpoint written before them does not record: not compared then."""


ADDED_ENTRIES = frozenset({"skipped"})
"""Checkpoint entries newer than some checkpoints: one that lacks them restores without."""


@dataclass
class LoopState:
    """Where training stands: optimizer steps done. The data position (epoch, batches of it
    consumed) is the sampler's, saved once as the checkpoint object ``data``."""

    step: int = 0


def upgrade_legacy_state(saved: dict[str, Any]) -> dict[str, Any]:
    """A training state written before the sampler owned the data cursor, in today's layout.

    Those checkpoints kept the cursor twice: ``loop`` held ``epoch`` / ``batch_in_epoch``
    and ``loader`` the sampler's own copy (with the plan's fingerprint). The loop's fields
    become the ``data`` entry's epoch and position; the fingerprint still guards the plan.
    """
    loop = saved.get("loop", {})
    if "data" in saved or "epoch" not in loop:
        return saved
    upgraded = {k: v for k, v in saved.items() if k not in ("loop", "loader")}
    upgraded["loop"] = {"step": loop["step"]}
    cursor = {"epoch": loop["epoch"], "position": loop["batch_in_epoch"]}
    upgraded["data"] = {**saved.get("loader", {}), **cursor}
    return upgraded


def check_compatible(saved: dict[str, Any], current: dict[str, Any], step: int) -> None:
    """Raise ResumeMismatchError naming the first differing fields of ``saved`` and the
    current run's ``compat`` (``runner.session.settings.compat_info``)."""
    diffs = [
        f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
        for k, v in current.items()
        if saved.get(k, COMPAT_DEFAULTS.get(k)) != v and (k in saved or k not in UNRECORDED_OK)
    ]
    if diffs:
        raise ResumeMismatchError(
            f"checkpoint {step_name(step)} was written by an incompatible config ("
            + "; ".join(diffs[:3])
            + ")",
            hint="restore the old settings, use another run name, or pass --force-restart "
            "to discard the old checkpoints",
        )


# --- RNG state ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    set_cuda_rng_states(state.get("cuda") or [])


def set_cuda_rng_states(states: list[torch.Tensor]) -> None:
    """Restore the saved per-GPU RNG states on the GPUs visible now: a checkpoint written
    with more GPUs visible restores the first ones, one written with fewer leaves the rest
    (and one written on CPUs restores nothing)."""
    if not torch.cuda.is_available():
        return
    for index, saved in enumerate(states[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(saved, index)


# --- the checkpointer ----------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointSettings:
    """What the checkpointer needs from the run: when to save, where to stage, what to record."""

    cadence: Cadence
    work_dir: Path
    """Local folder where step folders are staged before publishing."""
    seed: int
    compat: dict[str, Any] = field(default_factory=dict)
    """The config fields a resumed run must share (``run_info.json``;
    ``runner.session.settings.compat_info``)."""
    is_main: bool = True
    """Only the main process of a multi-process run writes checkpoints."""


class Checkpointer:
    """Decides when to checkpoint, writes the step folder, hands it to the manager.

    ``objects`` holds everything with a ``state_dict`` that must resume exactly (optimizer,
    lr_scheduler, scaler, generator wrapper, and ``data``: the loader's batch sampler, the one
    owner of the data cursor).
    """

    def __init__(
        self,
        settings: CheckpointSettings,
        manager: CheckpointManager,
        pipeline: TrainingPipeline,
        objects: dict[str, Any],
    ) -> None:
        self.settings, self.manager = settings, manager
        self.pipeline, self.objects = pipeline, objects
        self.cadence, self.work_dir = settings.cadence, settings.work_dir
        self.last_saved: int | None = None
        self._staged: list[Path] = []
        self.verify: Callable[[dict[str, torch.Tensor], str], None] | None = None
        """Called on every rank with the trained weights before each save (the ranks'
        checksum comparison of a multi-process run)."""

    def due(self, step: int, completed_epoch: int | None) -> bool:
        """Whether a checkpoint is due after ``step`` (on every rank alike)."""
        return self.cadence.due(step, completed_epoch)

    def save(self, state: LoopState) -> Path | None:
        """Write the step folder and start publishing it (returns once it is on disk)."""
        if self.last_saved == state.step:
            return None
        self.last_saved = state.step
        if self.verify is not None:
            self.verify(self.pipeline.trainable_parameters(), f"at step {state.step}")
        if not self.settings.is_main:
            return None
        folder = self.work_dir / CHECKPOINTS / step_name(state.step)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        with self.pipeline.averaged():  # the user-facing files hold the EMA weights, if any
            exported = self.pipeline.export(folder)
        weights = [p.relative_to(folder).as_posix() for p in exported]
        self.pipeline.save_trainable(folder / WEIGHTS_FILE)
        torch.save(
            {
                "loop": asdict(state),
                "rng": rng_state(),
                **{k: o.state_dict() for k, o in self.objects.items()},
            },
            folder / STATE_FILE,
        )
        info = {"step": state.step, "seed": self.settings.seed, **self.settings.compat}
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        # meta.weights: the user-facing files (what `launcher pull --step` fetches)
        self.manager.save_async(state.step, folder, meta={"weights": sorted(weights)})
        for old in self._staged:
            shutil.rmtree(old, ignore_errors=True)
        self._staged = [folder]
        log.info("checkpoint %s written; publishing", step_name(state.step))
        return folder

    def wait(self) -> None:
        self.manager.wait()

    def restore(self, folder: Path) -> LoopState:
        """Load weights and training state from a restored step folder."""
        self.pipeline.load_trainable(folder / WEIGHTS_FILE)
        # mmap: a full fine-tune's optimizer state (2 UNet copies) is paged in, not read whole
        saved = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True, mmap=True)
        saved = upgrade_legacy_state(saved)
        for key, obj in self.objects.items():
            if key in saved or key not in ADDED_ENTRIES:
                obj.load_state_dict(saved[key])
        set_rng_state(saved["rng"])
        state = LoopState(**saved["loop"])
        self.last_saved = state.step
        return state


@dataclass(frozen=True)
class ResumePoint:
    """A downloaded checkpoint that fits the config, and what was set aside to reach it."""

    step: int
    folder: Path
    info: dict[str, Any]
    set_aside: list[SetAsideCheckpoint]


def fetch_latest(
    manager: CheckpointManager, work_dir: Path, compat: dict[str, Any], *, heal: bool = True
) -> ResumePoint | None:
    """Download the newest valid checkpoint and check it fits ``compat`` (the current run's
    ``compat_info``); None if none.
    ``heal``: set aside newer checkpoints that fail their manifest check (main process)."""
    restored = manager.restore_newest_valid(work_dir / "restore", heal=heal)
    if restored is None:
        return None
    info = json.loads((restored.folder / INFO_FILE).read_text())
    check_compatible(info, compat, restored.step)
    return ResumePoint(restored.step, restored.folder, info, restored.set_aside)


def fetch_step(
    manager: CheckpointManager, work_dir: Path, compat: dict[str, Any], step: int
) -> ResumePoint:
    """Download checkpoint ``step`` (the one rank 0 chose) and check it fits ``compat``."""
    folder = work_dir / "restore" / step_name(step)
    shutil.rmtree(folder, ignore_errors=True)
    manager.restore(step, folder)
    info = json.loads((folder / INFO_FILE).read_text())
    check_compatible(info, compat, step)
    return ResumePoint(step, folder, info, [])
