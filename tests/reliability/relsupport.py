"""Helpers shared by the reliability tests: figure lines, closed ports, runner env.

(A plain module, not the conftest: ``tests/conftest.py`` is also named ``conftest``.)
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

FIGURES: list[str] = []


def figure(name: str, text: str) -> None:
    """Print one figure line (shown with ``-s``; also summarised at the end of the session)."""
    line = f"FIGURE {name}: {text}"
    FIGURES.append(line)
    print(line, flush=True)


def closed_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released: another process may take it
    later; `held_closed_port` keeps it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def held_closed_port() -> tuple[int, socket.socket]:
    """A 127.0.0.1 port that refuses connections for as long as the returned socket stays
    open: bound but not listening, so no other process can bind (and answer on) it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1], sock


def runner_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a ``python -m runner`` subprocess (offline, repo on the path).
    Values of ``""`` in ``extra`` remove the variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO),
               TOKENIZERS_PARALLELISM="false")  # fmt: skip
    for key, value in (extra or {}).items():
        if value == "":
            env.pop(key, None)
        else:
            env[key] = value
    return env
