"""Start Training: the form's config submitted exactly as `launcher submit` does (same
validation, same backends, idempotent: the same config again is the same run), sweeps too."""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import Any

from kubetune.config import parse_config
from kubetune.errors import KubetuneError, UserError
from launcher import api
from launcher.backends.base import RESUMABLE_PHASES
from launcher.config_files import local_data_lines, local_storage_lines
from launcher.ui.configs import FORM_NAME, _problem, generate
from launcher.ui.runs import Runs, one_line
from launcher.ui.security import UiSettings, checked_path


def start_training(
    values: Any,
    *,
    target: str,
    sweeps: list[str],
    replace: bool,
    runs: Runs,
    settings: UiSettings,
) -> dict[str, Any]:
    """Validate, then submit to `target` (`local` or `cluster`); problems come back like
    Generate Config's, a failed submit as one line in `error`."""
    checked = generate(values, settings.roots[0])
    if not checked["valid"]:
        return checked
    try:
        backend = runs.backend(target)
        text = checked["yaml"]
        cfg = parse_config(text, name=FORM_NAME)
        if backend.name == "local":
            if settings.restricted:
                checked_path(settings, cfg.base_output_dir, "base_output_dir")
            # as `launcher submit --local` refuses
            missing = local_data_lines(FORM_NAME, cfg) or local_storage_lines(FORM_NAME, cfg)
            if missing:
                return {
                    **checked,
                    "valid": False,
                    "problems": [_problem(p, FORM_NAME) for p in missing],
                }
        if sweeps:
            return {**checked, "submitted": _sweep(text, sweeps, backend, replace)}
        result = api.submit(cfg, backend, replace=replace)
    except KubetuneError as err:
        return {**checked, "error": one_line(err)}
    return {**checked, "submitted": [_record(result)]}


def resume_run(runs: Runs, backend_name: str, run: str) -> dict[str, Any]:
    """A stopped run's own config submitted again (as `launcher submit` of it would be): it
    continues from its newest checkpoint (on a cluster, in a new Job that replaces the failed
    one). Only a Failed, Preempted or Cancelled run."""
    backend = runs.backend(backend_name)
    status = backend.status(run)
    if status.phase not in RESUMABLE_PHASES:
        raise UserError(
            f"run {run} is {status.phase}: only a Failed, Preempted or Cancelled run resumes",
            hint="a finished run's weights are pulled; a running one is cancelled first",
        )
    return _record(api.submit(runs.config(backend, status), backend))


def _write_temp(text: str) -> str:
    with tempfile.NamedTemporaryFile(
        "w", suffix=".yaml", prefix="kubetune-ui-", delete=False, encoding="utf-8"
    ) as handle:
        handle.write(text)
    return handle.name


def _record(result: Any) -> dict[str, Any]:
    return {
        "run": result.run,
        "backend": result.backend,
        "created": result.created,
        "job_name": result.job_name,
        "output_uri": result.output_uri,
        "warnings": list(result.warnings),
    }


def _sweep(text: str, specs: list[str], backend: Any, replace: bool) -> list[dict[str, Any]]:
    """Every member validated first (as the CLI does); a cluster gets them all now, the local
    backend runs them one after another in a background thread."""
    from launcher.sweep_runs import submit_sweep
    from launcher.sweeps import expand, parse_axes

    path = _write_temp(text)
    sweep, members = expand(path, (), None, parse_axes(specs))
    planned = [{"run": m.run, "backend": backend.name, "sweep": sweep, "params": m.params}
               for m in members]  # fmt: skip

    def work() -> None:
        try:
            submit_sweep(sweep, members, backend, wait=False, echo=lambda _: None, replace=replace)
        finally:
            Path(path).unlink(missing_ok=True)

    if backend.name == "local":
        threading.Thread(target=work, name=f"sweep-{sweep}", daemon=True).start()
    else:
        work()
    return planned
