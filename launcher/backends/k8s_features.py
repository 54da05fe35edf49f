"""Job features that need a newer Kubernetes than the cluster runs (pure functions).

An API server older than a field prunes it silently (v1.20 drops `spec.suspend` and
`spec.podFailurePolicy`), so `submit` says what the cluster will ignore instead of relying
on it.
"""

from __future__ import annotations

import re
from typing import Any

# field of the Job spec -> (first version that honours it, what is lost without it)
JOB_FEATURES: dict[str, tuple[tuple[int, int], str]] = {
    "suspend": (
        (1, 21),
        "the Job starts at once instead of waiting for its Kueue queue (job.queue_name)",
    ),
    "podFailurePolicy": (
        (1, 26),
        "preemptions and SIGTERM checkpoints (exit 143) count against job.backoff_limit and "
        "a config error (exit 2) is retried",
    ),
}


# field of the Job spec -> (first version that has it, why the run cannot go without it)
REQUIRED_JOB_FEATURES: dict[str, tuple[tuple[int, int], str]] = {
    "completionMode": (
        (1, 24),
        "multi-node runs (job.nodes > 1) need Indexed Jobs: without them the pods get no "
        "completion index (node rank) and no stable hostname",
    ),
}


def parse_version(major: str, minor: str) -> tuple[int, int]:
    """(major, minor) from the /version fields; providers append '+' to the minor."""
    return int(re.sub(r"\D", "", major) or 0), int(re.sub(r"\D", "", minor) or 0)


def missing_features(job: dict[str, Any], version: tuple[int, int]) -> list[str]:
    """One message per Job spec field in use that a cluster of `version` cannot honour and
    the run cannot do without."""
    return [
        f"the cluster runs Kubernetes {_dotted(version)}, which has no Job spec.{field} "
        f"(GA in {_dotted(needed)}): {why}"
        for field, needed, why in _too_new(job, version, REQUIRED_JOB_FEATURES)
    ]


def ignored_features(job: dict[str, Any], version: tuple[int, int]) -> list[str]:
    """One warning per Job spec field in use that a cluster of `version` ignores."""
    return [
        f"the cluster runs Kubernetes {_dotted(version)}, which ignores Job spec.{field} "
        f"(needs {_dotted(needed)}+): {lost}"
        for field, needed, lost in _too_new(job, version, JOB_FEATURES)
    ]


def _too_new(
    job: dict[str, Any],
    version: tuple[int, int],
    features: dict[str, tuple[tuple[int, int], str]],
) -> list[tuple[str, tuple[int, int], str]]:
    """(field, version needed, why) of each of `features` the Job's spec uses and `version`
    predates."""
    spec = job.get("spec", {})
    return [
        (f, needed, why) for f, (needed, why) in features.items() if f in spec and version < needed
    ]


def _dotted(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"
