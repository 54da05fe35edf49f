"""A progress bar for a person at a terminal (tqdm), and plain log lines everywhere else: not
a TTY (a log file, `kubectl logs`) or inside a pod. Log lines then print above the bar."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from typing import Any


def wants_bar() -> bool:
    """stderr is a terminal and this is not a pod (KUBETUNE_PROGRESS_BAR=0 turns it off)."""
    if os.environ.get("KUBETUNE_PROGRESS_BAR", "1") == "0":
        return False
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return False
    return sys.stderr.isatty()


def step_bar(total: int, initial: int = 0) -> Any:
    """A tqdm bar over optimizer steps, on stderr."""
    from tqdm.auto import tqdm

    width = (
        {"dynamic_ncols": True}
        if shutil.get_terminal_size((0, 0)).columns > 0
        else {"ncols": 100, "nrows": 40}
    )
    return tqdm(total=total, initial=initial, unit="step", file=sys.stderr, desc="training",
                leave=True, **width)  # fmt: skip


@contextlib.contextmanager
def logs_above_bar(enabled: bool) -> Iterator[None]:
    """Route log lines through tqdm while a bar may be drawn, so they print above it."""
    if not enabled:
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield
