"""``python tests/crash_inject.py SPEC CONFIG [runner args]``: the real ``python -m runner``
with one crash injected, for tests of how a run ends when something fails mid-training.

SPEC is ``module:Class.method:N:Error[:RANK]``: the N-th call of that method raises the
builtin exception ``Error`` (``RuntimeError``, ``MemoryError``, ...) with the message
``injected crash (call N of Class.method)``; every other call runs the real method. With
RANK, only the process of that global rank (torchrun's ``RANK``) crashes. The rest
of the process is the unchanged entrypoint (``runner.__main__.main``), so the exception goes
through the same handlers and exit status as a real one. Tests use it only where no input can
make the runner fail at that point on purpose (an out-of-memory error on a CPU runner, an
error inside the validation pipeline).
"""

from __future__ import annotations

import builtins
import importlib
import os
import sys
from typing import Any


def install(spec: str) -> None:
    """Wrap the method SPEC names so that its N-th call raises (in the rank it names)."""
    module_name, qualname, calls, error, *rank = spec.split(":")
    if rank and os.environ.get("RANK", "0") != rank[0]:
        return
    owner_name, method = qualname.rsplit(".", 1)
    owner: Any = importlib.import_module(module_name)
    for part in owner_name.split("."):
        owner = getattr(owner, part)
    original = getattr(owner, method)
    exception = getattr(builtins, error)
    seen = 0

    def crashing(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        seen += 1
        if seen == int(calls):
            raise exception(f"injected crash (call {seen} of {qualname})")
        return original(*args, **kwargs)

    setattr(owner, method, crashing)


if __name__ == "__main__":
    install(sys.argv[1])
    from runner.__main__ import main

    sys.exit(main(sys.argv[2:]))
