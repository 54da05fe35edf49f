"""`ResumableLoader`: the current epoch's remaining batches, resumable mid-epoch (the sampler
owns the cursor), with the skipped-example count and the header checks that run beside
training settled on every rank alike."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

from torch.utils.data import DataLoader

from kubetune.dataset.preflight import PreflightReport
from kubetune.errors import DataError
from kubetune.humanize import count
from runner.data.batch import Batch, collate, place
from runner.data.buckets import BucketBatchSampler
from runner.data.prefetch import PREFETCH_BATCHES, ahead
from runner.data.streaming import StreamTargets
from runner.data.train_dataset import TrainDataset
from runner.data.workers import own_process_group, worker_context

T = TypeVar("T")


class _Plan:
    """The batch_sampler the DataLoader sees: the rest of the current epoch, keyed by epoch."""

    def __init__(self, sampler: BucketBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[Any]]:
        return self.sampler.remaining()  # from the cursor now: workers may run ahead of it


class ResumableLoader:
    """Iterates the current epoch's remaining batches. The sampler owns the data cursor: it
    advances as each batch is handed to the consumer (never as workers prefetch), so
    `state_dict` (the sampler's) makes a restored loader yield exactly the batches not yet
    consumed. After an epoch's last batch the cursor is at the next epoch's start."""

    def __init__(
        self,
        dataset: TrainDataset,
        sampler: BucketBatchSampler,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_bad: int = 0,
    ) -> None:
        self.dataset, self.sampler, self.num_workers = dataset, sampler, num_workers
        self.max_bad = max_bad
        """How many unreadable examples may be skipped before the run stops."""
        self.bad: dict[str, None] = {}
        self.on_bad: Callable[[list[str]], None] | None = None
        """Called with every skipped example's message so far (e.g. to note progress)."""
        self.buckets: list[tuple[int, int]] = []
        self.checks: Future[PreflightReport] | None = None
        """The dataset's header checks when they run beside training (`PreflightReport.pending`)."""
        self.on_checked: Callable[[PreflightReport], None] | None = None
        """Called once with the checked report (e.g. to store the dataset index)."""
        self.together: Together | None = None
        """Several processes (`runner.training.distributed.Ranks`): the checks are global
        rank 0's (the other ranks' `checks` never end), the skipped examples count over every
        rank, and every rank settles both at the same step (`settle`)."""
        self.verdict_due = False
        """Several processes: this rank wants `settle` (rank 0's checks ended, or this rank
        met an unreadable example); the loop's per-step vote carries it."""
        self._loader = DataLoader(
            dataset,
            batch_sampler=_Plan(sampler),
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers else None,
            multiprocessing_context=worker_context(dataset.source, num_workers),
            worker_init_fn=own_process_group if num_workers else None,
        )

    def __len__(self) -> int:
        return len(self.sampler)

    def bucket_sizes(self) -> list[tuple[int, int]]:
        """The bucket sizes (h, w) the batches may have (streaming: every bucket's)."""
        if isinstance(self.dataset.target_hw, StreamTargets):
            return list(self.buckets)
        return sorted(set(self.dataset.target_hw))

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Examples per bucket size ({} while a streaming order is still reading sizes)."""
        targets = self.dataset.target_hw
        if isinstance(targets, StreamTargets) and not targets.feed.complete:
            return {}
        return dict(sorted(Counter(targets[i] for i in range(len(targets))).items()))

    def estimated_len(self) -> int:
        """Batches per epoch without waiting for image sizes: `len` but for the streaming
        order before every size is known (then the fewest possible, a lower bound)."""
        estimate = getattr(self.sampler, "estimated_len", None)
        return estimate() if estimate is not None else len(self.sampler)

    def _count_bad(self, messages: list[str]) -> None:
        """Record skipped examples; past ``max_bad`` stop with a DataError listing them. While
        header checks run beside training, they are awaited first: a bad header fails the
        run with their error, as before step 1."""
        self.poll_checks(wait=True)
        self.bad.update(dict.fromkeys(messages))
        if self.on_bad is not None:
            self.on_bad(list(self.bad))
        if self.together is not None:  # several processes: counted over every rank, together
            self.verdict_due = True
        else:
            self._check_bad_limit()

    def _check_bad_limit(self) -> None:
        if len(self.bad) > self.max_bad:
            total = len(self.dataset)
            listed = "; ".join(list(self.bad)[:10]) + (" ..." if len(self.bad) > 10 else "")
            raise DataError(
                f"data_loader.max_bad_image_share: {len(self.bad)} of "
                f"{count(total, 'example')} are unreadable, more than the {self.max_bad} "
                f"allowed: {listed}",
                hint="fix or remove them (`launcher validate --data` lists them all), or "
                "raise data_loader.max_bad_image_share",
            )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)

    def poll_checks(self, wait: bool = False) -> None:
        """Once the header checks running beside training end (now, or at once with
        ``wait``): raise the DataError naming the first bad example, as the preflight would
        have, or hand the checked report to ``on_checked``."""
        if self.checks is None or not (wait or self.checks.done()):
            return
        if self.together is not None:  # not on one rank alone: the loop's vote settles them
            self.verdict_due = True
            return
        checks, self.checks = self.checks, None
        self._resolve(checks)

    def _resolve(self, checks: Future[PreflightReport]) -> None:
        report = checks.result()
        if self.on_checked is not None:
            self.on_checked(report)

    def settle(self) -> None:
        """Several processes, every rank at the same step: global rank 0 waits for its header
        checks (while they run); their DataError is raised on every rank (exit 2 everywhere,
        not a lost peer), else rank 0 hands the report to ``on_checked``. Then every rank's
        skipped examples count against ``max_bad``: the same error on every rank past it."""
        if self.together is None:
            return
        checks, self.checks, self.verdict_due = self.checks, None, False
        if checks is not None:  # on every rank alike: only `settle` ends them
            self.together.from_rank_0(lambda: self._resolve(checks))
        mine = list(self.bad)
        self.bad = dict.fromkeys(m for bad in self.together.gather(mine) for m in bad)
        if list(self.bad) != mine and self.on_bad is not None:  # the same list on every rank
            self.on_bad(list(self.bad))
        self._check_bad_limit()

    def end_checks(self) -> None:
        """As the run finishes: the header checks still running are waited for (settled by
        every rank together with several processes)."""
        if self.together is not None:
            self.settle()
        else:
            self.poll_checks(wait=True)

    def __iter__(self) -> Iterator[Batch]:
        batches: Iterator[Batch] = iter(self._loader)
        if self.num_workers == 0:
            batches = ahead(batches, PREFETCH_BATCHES)
        try:
            for batch in batches:
                self.poll_checks()
                place(batch, self.sampler.slots(self.sampler.epoch, self.sampler.position))
                self.sampler.advance()
                if "skipped" in batch:
                    self._count_bad(batch.pop("skipped"))
                yield batch
        finally:  # stop the prefetch thread here, not whenever the generator is collected
            close = getattr(batches, "close", None)
            if close is not None:
                close()


class Together(Protocol):
    """What the loader needs of a multi-process run's ranks (`Ranks`)."""

    def from_rank_0(self, work: Callable[[], T]) -> T: ...

    def gather(self, value: T) -> list[T]: ...


def cache_batches(loader: ResumableLoader, skip: set[int] | None = None) -> Iterator[Batch]:
    """Every example once (but those in `skip`), for filling the latent / text caches: the
    sampler's covering batches (epoch 0's, whatever epoch a resumed run is in, so caches are
    identical across resumes) cut into per-process batches. The loader's position does not
    move."""
    sampler, dataset = loader.sampler, loader.dataset
    size = sampler.batch_size
    for batch in sampler.cover_batches():
        batch = [i for i in batch if not skip or i not in skip]
        for start in range(0, len(batch), size):
            yield collate(dataset.__getitems__([(i, 0) for i in batch[start : start + size]]))
