"""How the DataLoader's worker processes start and which process group they belong to."""

from __future__ import annotations

import contextlib
import os

from kubetune.dataset.sources import Source
from kubetune.storage import fork_safe, is_remote


def own_process_group(_worker_id: int) -> None:
    """A loader worker leaves its training process's process group: torchrun stops a worker
    (SIGTERM, preemption) by signalling its whole group, and a loader worker killed by it
    made the training process fail ('DataLoader worker ... is killed by signal') instead
    of writing its stop checkpoint. The worker still ends with its training process (the
    DataLoader shuts it down; it exits when its parent is gone)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)


def worker_context(source: Source, num_workers: int) -> str | None:
    """How DataLoader workers start: forked (the default), unless they read a cloud store
    after this process opened one (obstore's runtime does not survive a fork; see
    ``kubetune.storage.fork_safe``): then from a clean forkserver process, which the dataset
    reaches pickled, each worker with its own client."""
    remote = any(is_remote(ref.uri) for ref in source.stores)
    return "forkserver" if num_workers and remote and not fork_safe() else None
