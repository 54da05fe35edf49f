"""The workload controllers of the fake API server in `k8s_fake` (a mixin of `FakeKube`):
the Job controller (one pod per attempt, or with completionMode Indexed one pod per index,
each with its completion index, hostname and subdomain; podFailurePolicy and backoffLimit per
failed pod), and minimal JobSet and TrainJob controllers.

The JobSet / TrainJob controllers are fakes of the real ones (kubernetes-sigs/jobset,
kubeflow/trainer), which cannot run here: they create the group's pods directly (no child
Job, no Service), name them as the real controllers do (`<name>-node-0-<index>`), copy the
pod template's labels and annotations, and end the workload: all pods succeeded → Completed
(JobSet) / Complete (TrainJob); a failed pod → the JobSet's failurePolicy (exit 2: Failed;
otherwise delete every pod and start the group again while `status.restarts` <
maxRestarts, preemption and exit 143 without counting), a TrainJob fails. Split from
k8s_fake.py to keep both files small."""

from __future__ import annotations

import copy
from typing import Any

from k8s_fake_controls import _now

Obj = dict[str, Any]
INDEX = "batch.kubernetes.io/job-completion-index"
GROUP_DONE = {"jobsets": "Completed", "trainjobs": "Complete"}
GROUP_PLURAL = {"JobSet": "jobsets", "TrainJob": "trainjobs"}


class WorkloadControllers:
    """Pod creation and completion for Jobs, JobSets and TrainJobs (`FakeKube` provides
    create / delete / select / _record / add_event)."""

    # --- pods ---------------------------------------------------------------------------

    def _create_pod(
        self, owner: Obj, template: Obj, labels: dict[str, str], index: int | None
    ) -> Obj | None:
        meta = owner["metadata"]
        if self.refuse_pods:
            self.add_event(
                meta["name"],
                "FailedCreate",
                f'Error creating: pods "{meta["name"]}-xxxxx" is forbidden: {self.refuse_pods}',
                kind=owner["kind"],
                ns=meta["namespace"],
            )
            return None
        tmeta = template.get("metadata") or {}
        annotations = dict(tmeta.get("annotations") or {})
        labels = {**(tmeta.get("labels") or {}), **labels}
        spec = copy.deepcopy(template["spec"])
        if index is not None:
            annotations[INDEX] = labels[INDEX] = str(index)
        pod = {
            "metadata": {
                "generateName": f"{meta['name']}-" + (f"{index}-" if index is not None else ""),
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": owner["apiVersion"],
                        "kind": owner["kind"],
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": spec,
            "status": {"phase": "Pending", "conditions": []},
        }
        return self.create("pods", meta["namespace"], pod)

    def owned_pods(self, name: str, ns: str = "default") -> list[Obj]:
        """Every pod of the workload NAME, oldest first."""
        with self.cond:
            pods = [
                p
                for p in self.select("pods", ns)
                if any(o["name"] == name for o in p["metadata"].get("ownerReferences", []))
            ]
            return sorted(pods, key=lambda p: int(p["metadata"]["resourceVersion"]))

    def _owner(self, pod: Obj) -> Obj | None:
        ns = pod["metadata"]["namespace"]
        for ref in pod["metadata"].get("ownerReferences", []):
            plural = {"Job": "jobs", **GROUP_PLURAL}.get(ref["kind"])
            if plural:
                return self.objects.get((plural, ns, ref["name"]))
        return None

    # --- Job ------------------------------------------------------------------------------

    def _job_started(self, job: Obj) -> None:
        job.setdefault("status", {})
        if job["spec"].get("suspend"):
            job["status"]["conditions"] = [_condition("Suspended", "JobSuspended", "")]
        else:
            job["status"]["startTime"] = _now()
            self._start_job_pods(job)

    def _start_job_pods(self, job: Obj) -> None:
        if job["spec"].get("completionMode") == "Indexed":
            for index in range(job["spec"].get("completions", 1)):
                self._new_pod(job, index)
        else:
            self._new_pod(job)

    def _new_pod(self, job: Obj, index: int | None = None) -> Obj | None:
        meta, template = job["metadata"], job["spec"]["template"]
        labels = {
            "batch.kubernetes.io/job-name": meta["name"],
            "job-name": meta["name"],
            "batch.kubernetes.io/controller-uid": meta["uid"],
        }
        if index is not None:
            template = copy.deepcopy(template)
            template["spec"]["hostname"] = f"{meta['name']}-{index}"
        pod = self._create_pod(job, template, labels, index)
        if pod is not None:
            job["status"]["active"] = job["status"].get("active", 0) + 1
            self._record("jobs", "MODIFIED", job)
        return pod

    def _policy_action(self, job_spec: Obj, pod: Obj, exit_code: int) -> tuple[str, int | None]:
        conditions = {c["type"]: c["status"] for c in pod["status"].get("conditions", [])}
        rules = job_spec.get("podFailurePolicy", {}).get("rules", [])
        for index, rule in enumerate(rules):
            if any(
                conditions.get(p["type"]) == p.get("status", "True")
                for p in rule.get("onPodConditions", [])
            ):
                return rule["action"], index
            codes = rule.get("onExitCodes")
            if codes and (exit_code in codes["values"]) == (codes["operator"] == "In"):
                return rule["action"], index
        return "Count", None

    def _pod_finished(self, pod: Obj, exit_code: int) -> None:
        owner = self._owner(pod)
        if owner is None:
            return
        if owner["kind"] != "Job":
            self._group_pod_finished(owner, pod, exit_code)
            return
        status = owner["status"]
        status["active"] = max(0, status.get("active", 1) - 1)
        index = pod["metadata"].get("annotations", {}).get(INDEX)
        if exit_code == 0:
            status["succeeded"] = status.get("succeeded", 0) + 1
            if status["succeeded"] >= owner["spec"].get("completions", 1):
                status["completionTime"] = _now()
                self._set_condition("jobs", owner, "Complete", "Completed", "")
            else:
                self._record("jobs", "MODIFIED", owner)
            return
        action, rule = self._policy_action(owner["spec"], pod, exit_code)
        if action == "FailJob":
            message = (
                f"Container trainer for pod {pod['metadata']['namespace']}/"
                f"{pod['metadata']['name']} failed with exit code {exit_code} matching "
                f"FailJob rule at index {rule}"
            )
            self._set_condition("jobs", owner, "Failed", "PodFailurePolicy", message)
            return
        if action == "Count":
            status["failed"] = status.get("failed", 0) + 1
            if status["failed"] > owner["spec"].get("backoffLimit", 6):
                message = "Job has reached the specified backoff limit"
                self._set_condition("jobs", owner, "Failed", "BackoffLimitExceeded", message)
                return
        self._new_pod(owner, None if index is None else int(index))

    def _set_condition(self, plural: str, obj: Obj, kind: str, reason: str, message: str) -> None:
        obj["status"]["conditions"] = [
            c for c in obj["status"].get("conditions", []) if c["type"] != "Suspended"
        ] + [_condition(kind, reason, message)]
        self._record(plural, "MODIFIED", obj)

    # --- JobSet / TrainJob ----------------------------------------------------------------

    def _group_started(self, plural: str, obj: Obj) -> None:
        obj.setdefault("status", {})
        if obj["spec"].get("suspend"):
            obj["status"]["conditions"] = [_condition("Suspended", "Suspended", "")]
        else:
            self._start_group(obj)

    def _start_group(self, obj: Obj) -> None:
        name = obj["metadata"]["name"]
        template, nodes = _group_template(obj)
        labels = {"jobset.sigs.k8s.io/jobset-name": name}
        for index in range(nodes):
            pod_template = copy.deepcopy(template)
            pod_template["spec"].update(hostname=f"{name}-node-0-{index}", subdomain=name)
            self._create_pod(obj, pod_template, labels, index)

    def _group_pod_finished(self, obj: Obj, pod: Obj, exit_code: int) -> None:
        plural = GROUP_PLURAL[obj["kind"]]
        pods = [p for p in self.owned_pods(obj["metadata"]["name"], obj["metadata"]["namespace"])]
        if exit_code == 0:
            if all(p["status"]["phase"] == "Succeeded" for p in pods):
                self._set_condition(plural, obj, GROUP_DONE[plural], "AllJobsCompleted", "")
            return
        policy = obj["spec"].get("failurePolicy") or {}
        restarts = obj["status"].get("restarts", 0)
        free = exit_code == 143 or any(
            c["type"] == "DisruptionTarget" for c in pod["status"].get("conditions", [])
        )
        if (
            plural == "jobsets"
            and exit_code != 2
            and (free or restarts < policy.get("maxRestarts", 0))
        ):
            obj["status"]["restarts"] = restarts + (0 if free else 1)
            for old in pods:
                self.delete("pods", old["metadata"]["namespace"], old["metadata"]["name"])
            self._record(plural, "MODIFIED", obj)
            self._start_group(obj)
            return
        message = f"pod {pod['metadata']['name']} failed with exit code {exit_code}"
        self._set_condition(plural, obj, "Failed", "FailedJobs", message)

    def admit(self, name: str, ns: str = "default", plural: str = "jobs") -> None:
        """What Kueue does on admission: unsuspend the workload."""
        with self.cond:
            obj = self.get(plural, ns, name)
            obj["spec"]["suspend"] = False
            obj["status"]["conditions"] = []
            obj["status"]["startTime"] = _now()
            if plural == "jobs":
                self._start_job_pods(obj)
            else:
                self._start_group(obj)


def _condition(kind: str, reason: str, message: str) -> Obj:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastTransitionTime": _now(),
    }


def _group_template(obj: Obj) -> tuple[Obj, int]:
    """The pod template and pod count of a JobSet's one replicated Job, or of a TrainJob
    (trainer fields on a `node` container, its runtimePatches' pod template on top)."""
    if obj["kind"] == "JobSet":
        job = obj["spec"]["replicatedJobs"][0]["template"]["spec"]
        return job["template"], job.get("completions", 1)
    trainer = obj["spec"]["trainer"]
    (patch,) = obj["spec"].get("runtimePatches") or [{}]
    replicated = ((patch.get("trainingRuntimeSpec") or {}).get("template", {}).get("spec", {})).get(
        "replicatedJobs"
    ) or [{}]
    template = copy.deepcopy(replicated[0].get("template", {}).get("spec", {}).get("template", {}))
    spec = template.setdefault("spec", {})
    container = {
        "name": "node",
        "image": trainer.get("image", "pytorch/pytorch"),
        "command": trainer.get("command", []),
        "env": trainer.get("env", []),
    }
    container.update({k: v for k, v in (spec.get("containers") or [{}])[0].items() if k != "name"})
    spec["containers"] = [container]
    return template, trainer.get("numNodes", 1)
