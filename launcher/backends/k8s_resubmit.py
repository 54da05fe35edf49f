"""What `submit` does with a workload of the same config that exists (a mixin of
`KubernetesBackend`): resume a Failed one, start a Succeeded one over with `--replace`, leave a
live one alone; the pods' log tails of a workload it deletes are saved first
(`k8s_saved_logs`), and `logs` finds them through the annotation on the new workload."""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

from kubetune.config import PipelineConfig, output_uri, run_name
from kubetune.config.cluster import sanitize_name
from kubetune.errors import ClusterError, ConfigError, UserError
from kubetune.layout import POD_LOGS
from launcher.backends import k8s_saved_logs
from launcher.backends.base import SubmitResult, read_progress
from launcher.backends.local import kubetune_home
from launcher.manifests import LABEL_RUN, build_manifests

Obj = dict[str, Any]
ANNOTATION_SAVED_LOGS = "kubetune.io/saved-logs"
"""On a workload that replaced one whose pods' logs were saved (`k8s_saved_logs`)."""
DELETION_WAIT = 180.0  # seconds submit waits for a cancelled Job of the same name to go


class Resubmits:
    """Needs the backend's namespace, core, _status, _progress, _pods, _config, _find_job,
    _create, _delete_job and _wait_gone."""

    namespace: str
    core: Any
    _status: Any
    _progress: Any
    _pods: Any
    _config: Any
    _find_job: Any
    _create: Any
    _delete_job: Any
    _wait_gone: Any

    def _again(
        self, ns: str, old: Obj, result: SubmitResult, cfg: PipelineConfig, replace: bool
    ) -> SubmitResult:
        """The same config submitted again, as the local backend treats it: a workload that
        ended Failed is deleted (foreground: its pods and ConfigMap go too; their logs are
        saved first) and created anew, its pod resuming from the newest checkpoint (the
        outputs stay); with `replace`, a Succeeded one is replaced by one whose first pod
        starts over from step 0; a live one, or a Succeeded one without `replace`, stays."""
        status, name = self._status(old, with_progress=False), old["metadata"]["name"]
        ended = status.phase in ("Failed", "Succeeded")
        if not ended and not replace:
            return dataclasses.replace(result, created=False)
        progress = self._progress(name)[0]
        where = f" at {progress.summary(live=not ended)}" if progress else ""
        if not ended:
            note = (
                f"already {status.phase.lower()} (same config){where}; --replace starts over "
                f"only a run that Succeeded: `launcher cancel {result.run}` stops this one"
            )
            return dataclasses.replace(result, created=False, note=note)
        if status.phase == "Succeeded" and not replace:
            note = f"already finished (same config){where}; --replace starts it over"
            return dataclasses.replace(result, created=False, note=note)
        saved = self._save_logs(ns, old, cfg)
        self._delete_job(ns, old)
        self._wait_gone([(old["kind"], old["metadata"]["name"])], DELETION_WAIT, ns)
        over = status.phase == "Succeeded"
        token = uuid.uuid4().hex[:12] if over else None
        config_map, job, *extras = build_manifests(cfg, namespace=ns, start_over=token)
        if saved.where or _annotations(old).get(ANNOTATION_SAVED_LOGS):
            job["metadata"].setdefault("annotations", {})[ANNOTATION_SAVED_LOGS] = "true"
        if not self._create(ns, config_map, job, extras):  # a concurrent submit resumed it
            return dataclasses.replace(result, created=False)
        why = f" ({status.reason})" if status.reason else ""
        note = (
            f"starting over from step 0 (--replace: a new {old['kind']}; the last one "
            f"Succeeded{where})"
            if over
            else f"resuming (a new {old['kind']}; the last one ended Failed{why}{where}): "
            "training continues from the newest checkpoint"
        )
        return dataclasses.replace(
            result,
            resumed_after=None if over else "Failed",
            note=note,
            saved_logs=saved.where,
            warnings=(*result.warnings, *_log_warnings(saved, old["kind"])),
        )

    def _over_if_completed(self, cfg: PipelineConfig, ns: str) -> tuple[list[Obj], str] | None:
        """The manifests (with a start-over token) and the note for `--replace` of a run that
        has no workload left (ttl_seconds_after_finished removed it) but whose progress.json
        says it completed; None otherwise (then it resumes, as without --replace)."""
        progress, _ = read_progress(output_uri(cfg), cfg.storage)
        if progress is None or progress.state != "completed":
            return None
        token = uuid.uuid4().hex[:12]
        note = (
            "starting over from step 0 (--replace: its workload is gone, the run completed "
            f"at {progress.summary(live=False)})"
        )
        return build_manifests(cfg, namespace=ns, start_over=token), note

    def _save_logs(self, ns: str, workload: Obj, cfg: PipelineConfig) -> k8s_saved_logs.Saved:
        """The tails of the workload's pods' logs, saved where `logs` finds them later."""
        when = k8s_saved_logs.stamp()
        texts = k8s_saved_logs.collect(self.core, ns, self._pods(workload)[0], when)
        if not texts:
            return k8s_saved_logs.Saved(None)
        return k8s_saved_logs.save(texts, when, self._log_stores(cfg, run_name(cfg)))

    def _log_stores(self, cfg: PipelineConfig | None, run: str) -> list[Any]:
        """Where saved logs go and are read from: the run's storage, then a local folder."""
        home = k8s_saved_logs.local_root(kubetune_home(), self.namespace, run)
        local = k8s_saved_logs.opener(str(home))
        if cfg is None:
            return [local]
        return [k8s_saved_logs.opener(output_uri(cfg), cfg.storage), local]

    def _find_job_or_saved(self, run: str) -> Obj | None:
        """The run's workload; None when it has none but logs were saved in the local folder
        when one was replaced (UserError if neither)."""
        try:
            return self._find_job(run)
        except UserError as err:
            folder = k8s_saved_logs.local_root(kubetune_home(), self.namespace, sanitize_name(run))
            if not (folder / POD_LOGS).is_dir():
                saved = (
                    "log tails saved when submit replaced a workload of the run stay in its "
                    f"outputs' {POD_LOGS}/"
                )
                hint = f"{err.hint}; {saved}" if err.hint else saved
                raise UserError(err.message, hint=hint) from None
            return None

    def _saved_lines(self, job: Obj, node: int) -> Iterator[str]:
        """The log tails saved when earlier workloads of the run were replaced (looked for
        only when the workload says some were saved)."""
        meta, cfg = job["metadata"], None
        if not _annotations(job).get(ANNOTATION_SAVED_LOGS):
            return iter(())
        with contextlib.suppress(ClusterError, ConfigError):
            cfg = self._config(meta["name"])
        run = (meta.get("labels") or {}).get(LABEL_RUN, meta["name"])
        return k8s_saved_logs.saved_lines(self._log_stores(cfg, run), node)


def _annotations(obj: Obj) -> dict[str, str]:
    return obj["metadata"].get("annotations") or {}


def _log_warnings(saved: k8s_saved_logs.Saved, kind: str) -> tuple[str, ...]:
    """What the user should know about the replaced workload's saved logs."""
    if saved.where is None and saved.problems:
        return (f"the pods' logs of the replaced {kind} were not saved ({saved.problems[-1]})",)
    if saved.problems:
        return (f"the run's storage did not take the replaced {kind}'s pod logs "
                f"({saved.problems[0]}): saved in {saved.where}",)  # fmt: skip
    return ()
