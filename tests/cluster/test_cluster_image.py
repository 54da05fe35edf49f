"""The image on a real node (`pytest -m cluster`): it can build torch.compile's kernels
(a C compiler and the Python headers, what ``compile_unet`` needs at its first step)."""

from __future__ import annotations

import pytest
from cluster_env import Cluster, wait_until

pytestmark = pytest.mark.cluster
CHECK = (
    "from runner.training.compile import compiler_problem; "
    "problem = compiler_problem(); print(problem or 'compiler ok'); raise SystemExit(bool(problem))"
)


def test_the_image_has_what_compile_unet_needs(cluster: Cluster, namespace: str) -> None:
    pod = {
        "metadata": {"name": "compiler-check"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "check",
                    "image": cluster.image,
                    "imagePullPolicy": "Never",
                    "command": ["python", "-c", CHECK],
                }
            ],
        },
    }
    cluster.core.create_namespaced_pod(namespace, pod)

    def finished() -> str | None:
        phase = cluster.core.read_namespaced_pod("compiler-check", namespace).status.phase
        return phase if phase in ("Succeeded", "Failed") else None

    phase = wait_until(finished, 300, "the compiler check pod")
    logs = cluster.core.read_namespaced_pod_log("compiler-check", namespace)
    assert phase == "Succeeded" and "compiler ok" in logs, logs
