"""A pod's multi-process launch: torch's torchrun, run in this process, that exits with the
workers' meaningful exit code.

Bare torchrun exits 1 whenever a worker fails, and 1 (a ``SignalException`` traceback) when
the agent itself gets SIGTERM, so the Job's podFailurePolicy never sees the runner's exit 2
(bad config or data: FailJob) or 143 (checkpointed on SIGTERM: Ignore). This runs the same
launcher (``torch.distributed.run``'s parser, every torchrun argument and ``PET_*`` default,
and its ``run``) and maps what ends it:

- workers failed: the root-cause (first) failure's exit code; a worker killed by signal N
  gives 128 + N, as a shell reports it;
- a signal N to the agent (SIGTERM on preemption): 128 + N once torchrun has passed the signal
  on to its workers and they stopped (143 for SIGTERM, what a checkpointed runner exits with).

Usage, as a pod runs it: ``python -m runner.launch [torchrun arguments] -m runner CONFIG``.
"""

from __future__ import annotations

import sys

SIGNAL_BASE = 128  # a process ended by signal N exits 128 + N (POSIX shells, Kubernetes)


def exit_code(code: int) -> int:
    """A worker's exit code as a pod reports it: negative (killed by signal N) -> 128 + N."""
    return SIGNAL_BASE - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv`` (default: the command line); return the pod's exit code."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    try:
        record(run)(args)  # `record`, as torchrun's main: the error file for a parent agent
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        print(err, file=sys.stderr)  # torchrun's table of failures, root cause first
        return exit_code(failure.exitcode)
    except SignalException as err:
        print(f"torchrun stopped by {err.sigval.name}; workers stopped", file=sys.stderr)
        return SIGNAL_BASE + int(err.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
