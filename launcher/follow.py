"""`submit --follow` / `logs -f` for a person at a terminal: the run's log lines scroll above
a tqdm bar of its optimizer steps (read from the runner's `step N/M` lines). Anywhere else (a
pipe, a file, CI) the lines print as they are."""

from __future__ import annotations

import re
import shutil
import sys
from collections.abc import Callable, Iterable
from typing import Any

STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) epoch (\d+) loss ([\d.eE+-]+)")
"""The runner's progress line (runner.reporting.progress): step, total, epoch, loss."""


def wants_bar(stream: Any = None) -> bool:
    return bool(getattr(stream or sys.stdout, "isatty", lambda: False)())


def bar_width() -> dict[str, Any]:
    """Follow the terminal's size; 100 x 40 where it reports none (a bare pty)."""
    if shutil.get_terminal_size((0, 0)).columns > 0:
        return {"dynamic_ncols": True}
    return {"ncols": 100, "nrows": 40}


def follow(lines: Iterable[str], echo: Callable[[str], None], *, bar: bool) -> None:
    """Print every line; with `bar`, above a progress bar that follows the step lines."""
    if not bar:
        for line in lines:
            echo(line)
        return
    from tqdm import tqdm

    progress: Any = None
    try:
        for line in lines:
            match = STEP_LINE.search(line)
            if match and progress is None:
                progress = tqdm(total=int(match[2]), unit="step", desc="training",
                                file=sys.stdout, **bar_width())  # fmt: skip
            if progress is None:
                echo(line)
                continue
            progress.write(line, file=sys.stdout)
            if match:
                progress.n = int(match[1])
                progress.set_postfix_str(f"epoch {match[3]}, loss {match[4]}")
    finally:
        if progress is not None:
            progress.close()
