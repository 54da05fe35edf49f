"""What the processes of one run agree on: the process group (its timeout), values decided
by rank 0 (seed, resume step, run identity), the outcome of a step one rank does alone or that
can fail on one rank alone (every rank raises the same error: ``from_rank_0``, ``each``), a
checksum of the trained weights, and the stop decision; a rank's fatal error left in the run's
store (``leave_failure``), where a rank that loses contact with it finds it (``lost_peers``).
With one process every call is a local no-op."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, NamedTuple, TypeVar

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from kubetune.errors import KubetuneError, ProcessGroupError, error_line, exit_code_for
from kubetune.humanize import count

log = logging.getLogger(__name__)
T = TypeVar("T")
DEFAULT_TIMEOUT_MINUTES = 60.0
"""The process-group timeout of runs without ``job.process_group_timeout_minutes``."""
FAILURES = "kubetune-failures/"
"""The store's key prefix of the ranks' fatal errors (one key per global rank)."""
PEER_WAIT_S = 2.0
"""How long a rank that lost a peer looks for that peer's error in the store."""


def start_processes(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> PartialState:
    """Join the run's process group (torchrun / accelerate launch; else one process) with
    the configured timeout: NCCL on CUDA, gloo on CPUs. First thing in a run: accelerate
    keeps the first state made in a process."""
    timeout = timedelta(minutes=timeout_minutes)
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timeout)


class Ranks:
    """This process's place in the run and the collectives the run needs."""

    def __init__(self, state: PartialState) -> None:
        self.index, self.count = state.process_index, state.num_processes
        self.is_main = state.is_main_process
        self.device = state.device

    @property
    def several(self) -> bool:
        return self.count > 1

    def agree(self, value: T) -> T:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if not self.several:
            return value
        box = [value if self.is_main else None]
        with lost_peers("agreeing on the run's start"):
            dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[return-value]

    def from_rank_0(self, work: Callable[[], T]) -> T:
        """``work()`` run on rank 0 alone, its result on every rank; if it raises, every rank
        raises that same error (a ``DataError`` stays a one-line exit-2 error on each rank,
        not a lost peer). Collective: every rank calls it at the same point."""
        if not self.several:
            return work()
        if not self.is_main:
            kind, value = self.agree(None)
            if kind == "error":
                raise value
            return value  # type: ignore[no-any-return]
        try:
            value = work()
        except BaseException as err:
            self.agree(("error", portable(err)))
            raise
        self.agree(("ok", value))
        return value

    def store(self, prefix: str) -> dist.Store:
        """The run's key-value store (the one the process group started from: torchrun's,
        reached by every rank of every node), its keys under ``prefix`` and this start of
        the workers (``TORCHELASTIC_RESTART_COUNT``: workers restarted by torchrun may meet
        the same store server, whose keys outlive them). Thread-safe."""
        return run_store(prefix)

    def leave_failure(self, err: BaseException) -> None:
        """Leave ``err`` in the run's store, where the other ranks find it if they lose contact
        with this one (module-level ``leave_failure``); nothing with one process."""
        if self.several:
            leave_failure(err)

    def each(self, work: Callable[[], T]) -> T:
        """``work()`` run on every rank, its result kept there (a step one rank does alone, e.g.
        rank 0's writes: ``work`` does nothing on the others); if it raised on any rank, every
        rank raises the error of the lowest such rank: the same one line and exit code
        everywhere, not a lost peer on the ranks that were fine. Collective: every rank calls
        it at the same point, and ``work`` holds no collective a failing rank could skip."""
        if not self.several:
            return work()
        mine: Exception | None = None
        try:
            value = work()
        except Exception as err:
            mine = err
        failures = self.gather(None if mine is None else portable(mine))
        first = next(((rank, err) for rank, err in enumerate(failures) if err is not None), None)
        if first is None:
            return value
        rank, err = first
        if rank == self.index:
            raise mine  # type: ignore[misc]  # our own error, with its traceback
        if mine is not None:
            log.warning("rank %d failed too (rank %d's error is reported): %s",
                        self.index, rank, mine)  # fmt: skip
        raise err

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (picklable), in rank order, on every rank (collective)."""
        if not self.several:
            return [value]
        values: list[Any] = [None] * self.count
        with lost_peers("gathering what each rank saw"):
            dist.all_gather_object(values, value)
        return values

    def stop_vote(self) -> StopVote:
        """A per-step vote on stopping that never waits on the device (collective: every
        rank calls it at the same point)."""
        return StopVote(dist.new_group(backend="gloo") if self.several else None)

    def check_same(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Raise ``ProcessGroupError`` naming the ranks whose trained weights differ from
        rank 0's (a checksum of ``state``, gathered on every rank)."""
        if not self.several:
            return
        digests: list[Any] = [None] * self.count
        with lost_peers(f"comparing the weights {where}"):
            dist.all_gather_object(digests, checksum(state))
        odd = [rank for rank, digest in enumerate(digests) if digest != digests[0]]
        if odd:
            raise ProcessGroupError(
                f"the trained weights of {'rank' if len(odd) == 1 else 'ranks'} {odd} differ from "
                f"rank 0's {where} "
                f"(checksums {[digests[0], *[digests[r] for r in odd]]})",
                hint="every rank must start from the same seed and weights; report this bug",
            )
        log.debug("ranks agree on the weights %s (%s)", where, digests[0])


class StopVote:
    """Whether any rank wants to stop, or to settle the dataset's header checks, asked once per
    step on every rank. The flags travel on a host-side (gloo) group, started asynchronously:
    each call returns the decision of the previous call's vote, so a step never waits on the
    device or the network, and every rank acts after the same step (one step after the
    signal, or after rank 0's checks ended or a rank met an unreadable example)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self.pending: tuple[Any, torch.Tensor] | None = None

    def __call__(self, flag: bool, settle: bool = False) -> Votes:
        if self.group is None:
            return Votes(flag, settle)
        decided = Votes(False, False)
        if self.pending is not None:
            work, value = self.pending
            with lost_peers("agreeing whether to stop"):
                work.wait()
            decided = Votes(*(bool(v) for v in value.tolist()))  # a CPU tensor: no device sync
        value = torch.tensor([int(flag), int(settle)])
        work = dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self.pending = (work, value)
        return decided

    def now(self, flag: bool, settle: bool = False) -> Votes:
        """This step's vote waited for, with the one still pending (a blocking vote): before a
        checkpoint, so that nothing a rank noted by now (an unreadable example trained as a
        stand-in, a SIGTERM) is left to a later step's decision."""
        earlier = self(flag, settle)
        if self.pending is None:
            return earlier
        work, value = self.pending
        self.pending = None
        with lost_peers("agreeing whether to stop"):
            work.wait()
        stop, due = (bool(v) for v in value.tolist())
        return Votes(earlier.stop or stop, earlier.settle or due)


class Votes(NamedTuple):
    """What every rank decided together after a step."""

    stop: bool
    """SIGTERM reached some rank: checkpoint and stop."""
    settle: bool
    """The dataset's header checks are due (``ResumableLoader.settle``)."""


class LossOf(nn.Module):
    """The pipeline's loss as a module whose parameters are the trained modules', so that
    DDP can own the gradient sync: its bucketed all-reduce starts during backward as buckets
    of gradients are ready. Frozen weights are neither broadcast nor synced."""

    def __init__(self, pipeline: Any) -> None:
        super().__init__()
        self.pipeline = [pipeline]  # not a submodule: only the trained modules are
        self.trained = nn.ModuleList(pipeline.trained_modules())

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self.pipeline[0].loss(batch, generator)


def data_parallel(pipeline: Any, device: torch.device) -> nn.Module | None:
    """``LossOf(pipeline)`` wrapped in DDP in a multi-process run (None with one process).
    Parameters that do not train are left out of DDP's broadcast and buckets;
    ``find_unused_parameters`` only for pipelines whose trained set changes (LoRA + TI
    freezes its vectors part way)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    module = LossOf(pipeline)
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in module.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    log.info("gradients averaged by DDP over %s", count(dist.get_world_size(), "process"))
    return DDP(
        module,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=bool(getattr(pipeline, "trained_set_changes", False)),
    )


def portable(err: BaseException) -> BaseException:
    """``err`` if a copy of it pickles back as the same error (kubetune's errors do), else a
    ``RankFailed`` with its line and exit code: what another rank can raise."""
    try:
        copy = pickle.loads(pickle.dumps(err))
        if type(copy) is type(err) and str(copy) == str(err):
            return err
    except Exception:  # noqa: BLE001, S110 - any exception that does not round-trip
        pass
    code = getattr(err, "exit_code", KubetuneError.exit_code)
    return RankFailed(str(err) or type(err).__name__, code)


class RankFailed(KubetuneError):
    """Another rank's error that does not travel as itself: its line and its exit code."""

    def __init__(self, message: str, exit_code: int = KubetuneError.exit_code) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self) -> tuple[type[RankFailed], tuple[str, int]]:
        return type(self), (self.message, self.exit_code)


def checksum(state: dict[str, torch.Tensor]) -> str:
    """A digest of the tensors, in name order: each one's float64 sum and sum of squares,
    computed where it lives (one transfer; bit-identical replicas match, a full fine-tune's
    billions of weights are not copied to the host)."""
    if not state:
        return "empty"
    with torch.no_grad():
        sums = [
            torch.stack([(t := state[name].detach().double()).sum(), (t * t).sum()])
            for name in sorted(state)
        ]
        values = torch.stack([s.to(sums[0].device) for s in sums]).cpu()
    digest = hashlib.sha256(",".join(sorted(state)).encode())
    digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def run_store(prefix: str) -> dist.Store:
    """``Ranks.store``: the process group's store, keys under ``prefix`` and this start."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    default = dist.distributed_c10d._get_default_store()
    return dist.PrefixStore(f"{prefix}attempt-{attempt}/", default)


def leave_failure(err: BaseException) -> None:
    """This rank's error line and exit code in the run's store (torchrun's, which outlives the
    workers), before the process exits and its peers' collectives fail: a rank that then loses
    contact reports this error, not a lost peer. Not a lost peer's error itself (a consequence,
    not a cause); best effort (the store may be gone too)."""
    if isinstance(err, (LostPeer, PeerFailed)) or not dist.is_initialized():
        return
    try:
        value = pickle.dumps((error_line(err), exit_code_for(err)))
        run_store(FAILURES).set(str(dist.get_rank()), value)
    except Exception as why:  # noqa: BLE001 - this rank's own error is what it exits with
        log.debug("could not leave this rank's error in the store: %r", why)


def peer_failure(wait_s: float = PEER_WAIT_S) -> PeerFailed | None:
    """The error another rank left (``leave_failure``; the lowest such rank's), looked for
    during at most ``wait_s`` s; None if none came (a node lost, a timeout) or the store is
    gone too. The look runs on a daemon thread given ``wait_s`` + 1 s: a store whose host
    vanished without closing its sockets would otherwise hold it for the store's own timeout."""
    if not dist.is_initialized():
        return None
    found: list[PeerFailed | None] = []
    look = threading.Thread(
        target=lambda: found.append(_left_failure(wait_s)), name="kubetune-peer-error", daemon=True
    )
    look.start()
    look.join(wait_s + 1.0)
    return found[0] if found else None


def _left_failure(wait_s: float) -> PeerFailed | None:
    deadline = time.monotonic() + wait_s
    try:
        store, me = run_store(FAILURES), dist.get_rank()
        others = [str(rank) for rank in range(dist.get_world_size()) if rank != me]
        while True:
            left = [key for key in others if store.check([key])]
            if left:
                rank = min(int(key) for key in left)
                line, code = pickle.loads(store.get(str(rank)))
                return PeerFailed(f"rank {rank} failed: {line}", code)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
    except Exception as why:  # noqa: BLE001 - no cause found: the lost peer is reported
        log.debug("could not read the other ranks' errors from the store: %r", why)
        return None


class PeerFailed(RankFailed):
    """Another rank's fatal error, met as a lost peer: its line (naming the rank) and exit
    code."""


class LostPeer(ProcessGroupError):
    """A collective lost its peer and no rank left an error saying why."""


LOST_PEER_SIGNS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")
"""Words in a ``RuntimeError`` from a collective whose peer died or timed out (gloo raises
plain RuntimeErrors; NCCL and the c10d store raise ``DistError`` subclasses)."""


@contextmanager
def lost_peers(doing: str) -> Iterator[None]:
    """A collective that fails because another process died or timed out becomes one
    clear ``ProcessGroupError`` (the checkpoint already published stays the resume point)."""
    try:
        yield
    except RuntimeError as err:
        text = str(err).strip()
        lost = isinstance(err, dist.DistError) or any(w in text.lower() for w in LOST_PEER_SIGNS)
        if not lost or isinstance(err, torch.OutOfMemoryError):
            raise
        cause = peer_failure()
        if cause is not None:
            raise cause from err
        first = text.splitlines()[0][:300] if text else type(err).__name__
        raise LostPeer(
            f"lost contact with the other processes while {doing}: {first}",
            hint="another rank or node stopped or timed out (job.process_group_timeout_minutes);"
            " rerun to resume from the last published checkpoint",
        ) from err
