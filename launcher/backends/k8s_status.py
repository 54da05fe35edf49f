"""Why a run is where it is: pure functions over workload (Job, JobSet, TrainJob), Pod and
Event dicts (API JSON shape)."""

from __future__ import annotations

from typing import Any

from kubetune.errors import EXIT_PREEMPTED, EXIT_USER_ERROR
from launcher.manifests import LABEL_QUEUE

COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
SUCCEEDED = {"Job": "Complete", "JobSet": "Completed", "TrainJob": "Complete"}

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
    return workload_phase(job, pods, events)


def workload_phase(
    obj: Obj, pods: list[Obj], events: list[Obj]
) -> tuple[str, str | None, str | None]:
    """(phase, reason, message) for a workload of any kind, its pods (oldest first) and its
    events."""
    if obj["metadata"].get("deletionTimestamp"):
        kind = obj.get("kind", "Job")
        return "Cancelling", "Terminating", f"the {kind} and its pods are being deleted"
    done = conditions(obj)
    if SUCCEEDED.get(obj.get("kind", "Job"), "Complete") in done:
        return "Succeeded", None, None
    if "Failed" in done:
        return "Failed", *_failure(done["Failed"], pods)
    if obj["spec"].get("suspend"):
        queue = obj["metadata"].get("labels", {}).get(LABEL_QUEUE)
        where = f"Kueue queue {queue!r}" if queue else "someone to unsuspend it"
        return "Suspended", "Queued", f"waiting for {where}"
    if not pods:
        for event in reversed(events):
            if event.get("reason") == "FailedCreate":
                reason = "QuotaExceeded" if "quota" in event.get("message", "") else "FailedCreate"
                return "Pending", reason, event.get("message")
        pod = "a pod" if obj.get("kind", "Job") == "Job" else "the pods"
        return (
            "Pending",
            "NoPod",
            f"waiting for the {obj.get('kind', 'Job')} controller to create {pod}",
        )
    return pods_phase(pods, workload_nodes(obj))


def pods_phase(pods: list[Obj], nodes: int = 1) -> tuple[str, str | None, str | None]:
    """Running once every node's pod runs (or succeeded); Pending with the first waiting
    pod's reason, or Retrying when a pod ended and its replacement is not there yet."""
    live = [p for p in pods if _phase(p) in ("Pending", "Running")]
    waiting = [p for p in live if _phase(p) == "Pending"]
    if waiting:
        return ("Pending", *pending_reason(waiting[0]))
    up = {node_rank(p) for p in pods if _phase(p) in ("Running", "Succeeded")}
    if live and (nodes == 1 or len(up) >= nodes):  # a node whose pod succeeded is done
        return "Running", None, None
    # A pod ended but the workload is not finished: another attempt is coming.
    ended = [p for p in pods if p not in live]
    if not ended:
        return "Pending", "NoPod", "waiting for the controller to create every node's pod"
    return "Pending", "Retrying", pod_failure(ended[-1]) or "the previous attempt ended"


def _phase(pod: Obj) -> str:
    return (pod.get("status") or {}).get("phase", "Pending")


def workload_nodes(obj: Obj) -> int:
    """How many pods (nodes) one attempt of the workload runs."""
    spec = obj.get("spec") or {}
    if obj.get("kind") == "JobSet":
        return int(spec["replicatedJobs"][0]["template"]["spec"].get("parallelism", 1))
    if obj.get("kind") == "TrainJob":
        return int((spec.get("trainer") or {}).get("numNodes", 1))
    return int(spec.get("parallelism", 1)) if spec.get("completionMode") == "Indexed" else 1


def node_rank(pod: Obj) -> int | None:
    """The pod's node rank: its completion index (Indexed Job, JobSet and TrainJob pods)."""
    value = (pod["metadata"].get("annotations") or {}).get(COMPLETION_INDEX)
    return int(value) if value is not None and value.isdigit() else None


def finished(obj: Obj) -> bool:
    """Whether the workload succeeded or failed for good."""
    done = conditions(obj)
    return SUCCEEDED.get(obj.get("kind", "Job"), "Complete") in done or "Failed" in done


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
    """Pods that ended in failure (including preemptions the Job did not count): attempts
    of a one-node run; a multi-node group restart counts each of its pods."""
    return sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
