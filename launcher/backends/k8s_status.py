"""Why a Job is where it is: pure functions over Job / Pod / Event dicts (API JSON shape)."""

from __future__ import annotations

from typing import Any

from kubetune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from launcher.manifests import LABEL_QUEUE

Obj = dict[str, Any]
WAITING_PROBLEMS = {
    "ImagePullBackOff": "cannot pull the image (check job.image and imagePullSecrets)",
    "ErrImagePull": "cannot pull the image (check job.image and imagePullSecrets)",
    "InvalidImageName": "job.image is not a valid image reference",
    "CreateContainerConfigError": "the container cannot be configured (a missing Secret or key?)",
    "CrashLoopBackOff": "the container keeps crashing",
}


def conditions(obj: Obj) -> dict[str, Obj]:
    """The object's conditions that are True, by type."""
    return {
        c["type"]: c
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def job_phase(job: Obj, pods: list[Obj], events: list[Obj]) -> tuple[str, str | None, str | None]:
    """(phase, reason, message) for a Job, its pods (oldest first) and its events."""
    if job["metadata"].get("deletionTimestamp"):
        return "Cancelling", "Terminating", "the Job and its pods are being deleted"
    done = conditions(job)
    if "Complete" in done:
        return "Succeeded", None, None
    if "Failed" in done:
        return "Failed", *_failure(done["Failed"], pods)
    if job["spec"].get("suspend"):
        queue = job["metadata"].get("labels", {}).get(LABEL_QUEUE)
        where = f"Kueue queue {queue!r}" if queue else "someone to unsuspend it"
        return "Suspended", "Queued", f"waiting for {where}"
    if not pods:
        for event in reversed(events):
            if event.get("reason") == "FailedCreate":
                reason = "QuotaExceeded" if "quota" in event.get("message", "") else "FailedCreate"
                return "Pending", reason, event.get("message")
        return "Pending", "NoPod", "waiting for the Job controller to create a pod"
    latest = pods[-1]
    phase = (latest.get("status") or {}).get("phase", "Pending")
    if phase == "Running":
        return "Running", None, None
    if phase == "Pending":
        return ("Pending", *pending_reason(latest))
    # The newest pod ended but the Job is not finished: another attempt is coming.
    return "Pending", "Retrying", pod_failure(latest) or "the previous attempt ended"


def pending_reason(pod: Obj) -> tuple[str | None, str | None]:
    """Why a pod is Pending: unschedulable, image pull, container config, or just starting."""
    status = pod.get("status") or {}
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", cond.get("message")
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        reason = waiting.get("reason")
        if reason in WAITING_PROBLEMS:
            detail = waiting.get("message")
            return reason, f"{WAITING_PROBLEMS[reason]}{': ' + detail if detail else ''}"
        if reason:
            return reason, waiting.get("message")
    return "Starting", None


def pod_failure(pod: Obj) -> str | None:
    """One line on why a pod failed: OOMKilled, exit code meaning, preemption."""
    status = pod.get("status") or {}
    if "DisruptionTarget" in conditions(pod):
        return "the pod was preempted or evicted (not counted as a failure)"
    for cs in status.get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated") or {}
        code = term.get("exitCode")
        if code in (None, 0):
            continue
        if term.get("reason") == "OOMKilled":
            return (
                "OOMKilled: out of memory (raise job.memory, lower train_batch_size or "
                "enable gradient_checkpointing)"
            )
        if code == EXIT_USER_ERROR:
            return "exit code 2: config or data error (see `launcher logs RUN`)"
        if code == EXIT_PREEMPTED:
            return "exit code 143: stopped by SIGTERM after writing a checkpoint"
        return f"exit code {code} ({term.get('reason') or 'Error'})"
    return None


def _failure(cond: Obj, pods: list[Obj]) -> tuple[str | None, str | None]:
    reason = cond.get("reason")
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    detail = pod_failure(failed[-1]) if failed else None
    if reason == "DeadlineExceeded":
        return reason, "job.active_deadline_seconds was reached"
    parts = [p for p in (detail, cond.get("message")) if p]
    return reason, "; ".join(parts) or None


def retries(pods: list[Obj]) -> int:
    """Attempts that ended in failure (including preemptions the Job did not count)."""
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
