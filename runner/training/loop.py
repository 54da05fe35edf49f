"""The training loop: step → checkpoint (when due) → validation (when due), with a SIGTERM
flag checked between steps (checkpoint, publish, exit 143). With several processes, what the
ranks noted (a SIGTERM, an unreadable example, rank 0's header checks ending) is decided by
all of them after the same step, and settled before any checkpoint."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, TypeVar

import torch
from accelerate import Accelerator

from kubetune.errors import EXIT_PREEMPTED, Preempted
from kubetune.layout import step_name
from runner.checkpoint.state import Checkpointer, LoopState
from runner.pipelines.base import Batch, TrainingPipeline
from runner.reporting.progress import ProgressReporter
from runner.reporting.run_events import RunEvents
from runner.training.distributed import Ranks, StopVote, Votes, lost_peers
from runner.training.validation import Validator

log = logging.getLogger(__name__)
T = TypeVar("T")


def install_sigterm_handler() -> threading.Event:
    """SIGTERM sets the returned flag; the loop finishes its step and checkpoints."""
    flag = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        flag.set()

    signal.signal(signal.SIGTERM, handle)
    return flag


class GeneratorState:
    """A ``torch.Generator`` with the ``state_dict`` interface checkpoints use."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["state"])


class StepRunner:
    """One optimizer step over a group of micro-batches (gradient accumulation)."""

    def __init__(
        self,
        accelerator: Accelerator,
        pipeline: TrainingPipeline,
        optimizer: Any,
        lr_scheduler: Any,
        generator: torch.Generator,
        max_grad_norm: float | None,
    ) -> None:
        self.accelerator, self.pipeline = accelerator, pipeline
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.generator, self.max_grad_norm = generator, max_grad_norm
        self.params = list(pipeline.trainable_parameters().values())
        self.inner_optimizer = getattr(optimizer, "optimizer", optimizer)
        """The optimizer accelerate wraps (its wrapper inspects signatures and looks packages
        up on every call; only the GradScaler path needs it)."""
        self.replica: torch.nn.Module | None = None
        """The pipeline's loss under DDP (``runner.training.distributed.data_parallel``);
        without it, several processes average gradients with ``_all_reduce_grads``."""

    def _forward(self, batch: Batch) -> torch.Tensor:
        if self.replica is None:
            return self.pipeline.loss(batch, self.generator)
        return self.replica(batch, self.generator)  # type: ignore[no-any-return]

    def _sync(self, *, last: bool) -> AbstractContextManager[Any]:
        """DDP's ``no_sync`` for every micro-batch but a step's last."""
        if self.replica is None or last:
            return nullcontext()
        return self.replica.no_sync()  # type: ignore[operator,no-any-return]

    @property
    def lr(self) -> float:
        return float(self.lr_scheduler.get_last_lr()[0])

    @property
    def lrs(self) -> dict[str, float]:
        """Every param group's current rate by its name (``group-<i>`` if unnamed)."""
        groups = self.optimizer.param_groups
        return {
            g.get("name", f"group-{i}"): float(lr)
            for i, (g, lr) in enumerate(zip(groups, self.lr_scheduler.get_last_lr(), strict=False))
        }

    def run(self, group: list[Batch], step: int) -> torch.Tensor:
        """Forward/backward each micro-batch, then clip, step, schedule; the mean loss.
        With ``replica`` (DDP over the pipeline's loss) the gradients are averaged across
        processes during the last micro-batch's backward, the others accumulate locally."""
        self.pipeline.before_step(step)
        total = torch.zeros((), device=self.accelerator.device)
        for i, batch in enumerate(group):
            with self._sync(last=i == len(group) - 1):
                with self.accelerator.autocast():
                    loss = self._forward(batch) / len(group)
                self.accelerator.backward(loss)
            total += loss.detach()
        if self.replica is None:
            self._all_reduce_grads()
        if self.max_grad_norm is not None:
            self._clip()
        self._step_optimizer()
        if not getattr(self.optimizer, "step_was_skipped", False):  # fp16 overflow: no step
            self.lr_scheduler.step()
        self.inner_optimizer.zero_grad(set_to_none=True)
        self.pipeline.after_optimizer_step()
        return total

    def _clip(self) -> None:
        """Clip the gradients' global norm (unscaled first under fp16's GradScaler); the
        same as ``accelerator.clip_grad_norm_`` for these plain tensors, without its
        per-step DTensor checks."""
        assert self.max_grad_norm is not None
        if self.accelerator.scaler is not None:
            self.accelerator.unscale_gradients()
        live = [p for p in self.params if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(live, self.max_grad_norm)

    def _step_optimizer(self) -> None:
        """accelerate's optimizer wrapper when it has work to do (GradScaler); otherwise the
        wrapped optimizer's own step (the wrapper looks packages up on every call)."""
        if self.accelerator.scaler is not None:
            self.optimizer.step()
        else:
            self.inner_optimizer.step()

    def _all_reduce_grads(self) -> None:
        """Average gradients across processes in one flat buffer after backward (no overlap;
        kept for runs without a ``replica`` and as the benchmark's baseline)."""
        if self.accelerator.num_processes == 1:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            flat = self.accelerator.reduce(flat, reduction="mean")
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()


@dataclass
class StepInput:
    group: list[Batch]
    epoch: int
    """The epoch the group's batches come from (for progress)."""
    completed_epoch: int | None
    """Epochs completed once this step is done (set only on an epoch's last step)."""

    @property
    def images(self) -> int:
        """Examples the step trains on, over all processes (each micro-batch's global batch)."""
        return sum(int(b.get("global_size", len(b["caption"]))) for b in self.group)


def step_inputs(loader: Any, accumulation: int) -> Iterator[StepInput]:
    """Group the loader's batches into optimizer steps, never across an epoch boundary.
    The loader's sampler owns the data cursor: an epoch ends when its epoch moves on."""
    while True:
        group: list[Batch] = []
        epoch = loader.epoch
        for batch in loader:  # the rest of the loader's current epoch
            group.append(batch)
            epoch_done = loader.epoch != epoch
            if len(group) == accumulation or epoch_done:
                yield StepInput(group, epoch, loader.epoch if epoch_done else None)
                group = []


def resumed_epoch(loader: Any) -> int | None:
    """The epochs completed by the step a run resumes at, when that step ended an epoch (the
    data cursor stands at a later epoch's start); None otherwise (``Cadence.due``'s
    ``completed_epoch``)."""
    position = getattr(getattr(loader, "sampler", None), "position", None)
    return loader.epoch if position == 0 and loader.epoch > 0 else None


@dataclass
class Loop:
    """Everything the loop talks to."""

    runner: StepRunner
    loader: Any
    checkpointer: Checkpointer
    validator: Validator
    progress: ProgressReporter
    stop: threading.Event
    total_steps: int
    accumulation: int
    events: RunEvents
    ranks: Ranks | None = None
    """A multi-process run's ranks: the stop decision is theirs together."""
    _vote: StopVote | None = field(default=None, init=False, repr=False)

    def run(self, state: LoopState) -> None:
        """Train until ``total_steps``; raise Preempted after a SIGTERM checkpoint."""
        self._redo_validation(state.step)
        if state.step >= self.total_steps:
            return
        for item in step_inputs(self.loader, self.accumulation):
            with self._collective(state.step + 1):
                loss = self.runner.run(item.group, state.step)
            state.step += 1
            log.debug("step %d done", state.step)
            self.progress.update(
                state.step, item.epoch, loss, self.runner.lr, item.images, self.runner.lrs
            )
            last = state.step >= self.total_steps
            saving = self.checkpointer.due(state.step, item.completed_epoch)
            if saving:  # every rank's notes settled first: no checkpoint trains a stand-in
                self._act(self._decide(now=True), state, last)
                self.each(lambda: self.checkpointer.save(state))
                self.progress.note(last_checkpoint_step=state.step)
            self._validate(state.step, item.completed_epoch)
            if last:
                return
            if not saving:
                self._act(self._decide(), state, last)

    def each(self, work: Callable[[], T]) -> T:
        """``work()`` on every rank; its failure on any rank ends every rank alike
        (``Ranks.each``: a write of rank 0 alone, refused, is not a lost peer elsewhere)."""
        return work() if self.ranks is None else self.ranks.each(work)

    def _validate(self, step: int, completed_epoch: int | None) -> None:
        if not self.validator.due(step, completed_epoch):
            return
        with self.progress.paused():  # validation is not training time (ETA, img/s)
            validated = self.each(lambda: self.validator.maybe_validate(step, completed_epoch))
        if validated:
            self.events.validation(step)

    def _act(self, decided: Votes, state: LoopState, last: bool) -> None:
        """What the ranks decided together: settle rank 0's header checks and every rank's
        skipped examples, stop (not after the last step: the run is complete)."""
        if decided.settle:
            self.loader.settle()
        if decided.stop and not last:
            self._preempt(state)

    def _redo_validation(self, step: int) -> None:
        """The resumed step's validation, when it was due but never finished (the run stopped
        while validating, after that step's checkpoint), is done now, before training goes
        on: a run does not finish without its last step's images."""
        epoch = resumed_epoch(self.loader)
        if step and self.validator.due(step, epoch) and self.each(lambda: self._redo(step, epoch)):
            self.events.validation(step)  # rank 0's failure to is every rank's (`each`)

    def _redo(self, step: int, epoch: int | None) -> bool:
        if not self.validator.missing(step, epoch):  # rank 0 alone has the store
            return False
        log.info("validation at step %d did not finish before the restart: redoing it", step)
        with self.progress.paused():
            self.validator.validate(step)
        return True

    def _collective(self, step: int) -> AbstractContextManager[None]:
        """A step whose gradient all-reduce loses a peer fails with one clear message."""
        if self.ranks is None:
            return nullcontext()
        return lost_peers(f"training step {step}")

    def _decide(self, now: bool = False) -> Votes:
        """SIGTERM on any rank stops every rank after the same step, and header checks beside
        training are settled by every rank after the same step (``StopVote``); ``now``: this
        step's notes too, waited for (before a checkpoint)."""
        due = bool(getattr(self.loader, "verdict_due", False))
        if self.ranks is None:
            return Votes(self.stop.is_set(), due)
        if self._vote is None:  # made at the first step's end, on every rank alike
            self._vote = self.ranks.stop_vote()
        if now:
            return self._vote.now(self.stop.is_set(), due)
        return self._vote(self.stop.is_set(), due)

    def _preempt(self, state: LoopState) -> None:
        """Checkpoint (every rank's notes settled first) and stop; nobody exits before rank 0
        published the checkpoint, and its failure to is every rank's error."""
        if self._decide(now=True).settle:
            self.loader.settle()
        self.each(lambda: self._publish_stop(state))
        raise Preempted(
            f"stopped by SIGTERM after step {state.step} (checkpoint "
            f"{step_name(state.step)} published); resume by rerunning the same command"
        )

    def _publish_stop(self, state: LoopState) -> None:
        """The stop checkpoint, then the run's record of the stop (rank 0 writes both)."""
        self.checkpointer.save(state)
        self.checkpointer.wait()
        # the step it stopped at, not the last log line's: `status` says where it resumes
        self.progress.note(step=state.step, last_checkpoint_step=state.step)
        self.progress.finish("preempted", exit_code=EXIT_PREEMPTED)
