"""`launcher submit --sweep` and `launcher list --sweep` (click-free logic the CLI calls).

On a cluster every member is submitted at once (with `job.queue_name`, Kueue admits them as
GPUs free up instead of oversubscribing the pool); `--local` runs them one after another."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kubetune.humanize import count
from launcher import api
from launcher.sweeps import LABEL_SWEEP, PARAM_LABEL_PREFIX, Member

if TYPE_CHECKING:
    from launcher.backends.base import Backend, RunStatus

Echo = Callable[[str], None]


def submit_sweep(
    sweep: str,
    members: list[Member],
    backend: Backend,
    *,
    wait: bool,
    echo: Echo,
    poll: float = 2.0,
    replace: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Submit every member of ``sweep`` (see ``launcher.sweeps.expand``); a local backend runs
    each to its end before the next, a cluster gets all at once (then, with ``wait``, waits
    for each). Returns (JSON document, all succeeded)."""
    sequential = backend.name == "local"
    echo(
        f"sweep {sweep}: {count(len(members), 'run')}"
        + (", one after another" if sequential else "")
    )
    records: list[dict[str, Any]] = []
    for member in members:
        result = api.submit(member.config, backend, replace=replace)
        verb = result.note or ("submitted" if result.created else "already submitted")
        echo(f"{result.run}: {verb}  {_params(member)}")
        records.append({"submit": result.__dict__, "params": member.params})
        if sequential:
            records[-1]["status"] = _finish(backend, result.run, poll, echo)
    if wait and not sequential:
        for record in records:
            record["status"] = _finish(backend, record["submit"]["run"], poll, echo)
    ok = all(r.get("status", {}).get("phase", "Succeeded") == "Succeeded" for r in records)
    return {"sweep": sweep, "runs": records}, ok


def _finish(backend: Backend, run: str, poll: float, echo: Echo) -> dict[str, Any]:
    status = api.wait(backend, run, poll=poll)
    echo(status.summary())
    return status.to_json()


def _params(member: Member) -> str:
    return " ".join(f"{k}={v}" for k, v in member.params.items())


def sweep_statuses(backend: Backend, sweep: str) -> list[RunStatus]:
    """The sweep's runs with their progress, in name order."""
    runs = [r.run for r in backend.list() if r.labels.get(LABEL_SWEEP) == sweep]
    return [backend.status(run) for run in sorted(runs)]


def sweep_table(statuses: list[RunStatus]) -> list[str]:
    """One aligned line per run: name, phase, step, loss, then the swept parameters."""
    keys = sorted({k for s in statuses for k in s.labels if k.startswith(PARAM_LABEL_PREFIX)})
    header = ["RUN", "PHASE", "STEP", "LOSS", *(k[len(PARAM_LABEL_PREFIX) :] for k in keys)]
    rows = [header]
    for s in statuses:
        p = s.progress
        step = f"{p.step}/{p.total_steps or '?'}" if p and p.step is not None else "-"
        loss = f"{p.loss:.4g}" if p and p.loss is not None else "-"
        rows.append([s.run, s.phase, step, loss, *(s.labels.get(k, "-") for k in keys)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]


def sweep_json(statuses: list[RunStatus]) -> str:
    return json.dumps([s.to_json() for s in statuses], indent=2, default=str)
