"""A start-over that `launcher submit --replace` asked of a cluster workload, carried out once.

Locally `--replace` starts the runner with ``--no-resume`` for one attempt. A cluster
workload's pods are retried by its controller with the same spec, so the workload carries a
token instead (``$KUBETUNE_START_OVER``, `kubetune.layout.START_OVER_ENV`): the first pod that
sees a token the run's ``start-over.json`` does not hold discards the checkpoints and records
it; a retried pod of the same workload finds it recorded and resumes as usual.
"""

from __future__ import annotations

import json
import logging
import os

from kubetune.layout import START_OVER_ENV, START_OVER_KEY, utc_now
from kubetune.storage import ObjectStore

log = logging.getLogger(__name__)


def requested_token() -> str | None:
    """The workload's start-over token, if it carries one."""
    return os.environ.get(START_OVER_ENV) or None


def pending(store: ObjectStore, token: str | None) -> bool:
    """Whether ``token`` asks for a start-over not carried out yet."""
    if token is None:
        return False
    try:
        done = json.loads(store.get_bytes(START_OVER_KEY))
    except FileNotFoundError:
        return True
    except ValueError:
        log.warning("%s is not valid JSON: treating the start-over as not done", START_OVER_KEY)
        return True
    return not isinstance(done, dict) or done.get("token") != token


def record(store: ObjectStore, token: str) -> None:
    """Mark ``token``'s start-over done (after the checkpoints are discarded)."""
    store.put_bytes(START_OVER_KEY, json.dumps({"token": token, "at": utc_now()}).encode())
