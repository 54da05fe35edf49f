"""The logs of a cluster run's pods, saved before `submit` deletes its workload (a Failed one it
resumes, a Succeeded one `--replace` starts over): deleting a Job deletes its pods, and the
pods' logs with them.

What is kept: the last TAIL_LINES lines of each container, at most TAIL_BYTES of them (the end
kept), of the newest MAX_PODS pods that started, one file per node:
`pod-logs/<UTC time>/node-<K>.log` (kubetune.layout) in the run's output location; when the
launcher cannot write there, the same under `$KUBETUNE_HOME/cluster-logs/<namespace>/<run>/`.
`launcher logs` prints them, oldest first, before the current workload's pods.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes.client.exceptions import ApiException

from kubetune.layout import POD_LOGS, parse_pod_logs_key, pod_logs_key
from kubetune.storage import ObjectStore, open_store
from launcher.backends import k8s_status

Obj = dict[str, Any]
TAIL_LINES = 1000
TAIL_BYTES = 256 * 1024
MAX_PODS = 16
CUT = (
    f"[... earlier output not saved: the last {TAIL_LINES} lines, at most "
    f"{TAIL_BYTES // 1024} KiB, are kept]"
)


@dataclass(frozen=True)
class Saved:
    """Where the logs went (a folder URI or path; None if nowhere) and why not elsewhere."""

    where: str | None
    problems: tuple[str, ...] = ()


def local_root(home: Path, namespace: str, run: str) -> Path:
    """The local folder a run's logs go to when its storage is not writable from here."""
    return home / "cluster-logs" / namespace / run


def stamp() -> str:
    """Now, as a pod-logs folder name (microseconds: replacements a second apart sort)."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")


def collect(core: Any, ns: str, pods: list[Obj], when: str) -> dict[int, str]:
    """Node rank → its pods' log tails (oldest pod first), each container under a header."""
    texts: dict[int, list[str]] = {}
    started = [p for p in pods if p.get("status", {}).get("phase") != "Pending"]
    for pod in started[-MAX_PODS:]:
        node = k8s_status.node_rank(pod) or 0
        for container in pod["spec"].get("containers", []):
            texts.setdefault(node, []).append(_section(core, ns, pod, container["name"], when))
    return {node: "".join(parts) for node, parts in texts.items()}


def _section(core: Any, ns: str, pod: Obj, container: str, when: str) -> str:
    name = pod["metadata"]["name"]
    header = f"==> pod {name} [{container}] ({_ended(pod, container)}; saved {when}) <=="
    try:
        resp = core.read_namespaced_pod_log(
            name, ns, container=container, tail_lines=TAIL_LINES, _preload_content=False
        )
        body = tail(resp.data)
    except ApiException as err:
        body = f"(no log: {err.status} {err.reason})\n"
    return f"{header}\n{body}" + ("" if body.endswith("\n") or not body else "\n")


def tail(data: bytes) -> str:
    """The end of a log: at most TAIL_BYTES, from a line start, marked when cut."""
    if len(data) <= TAIL_BYTES:
        return data.decode("utf-8", errors="replace")
    end = data[-TAIL_BYTES:]
    end = end[end.find(b"\n") + 1 :] if b"\n" in end else end
    return f"{CUT}\n" + end.decode("utf-8", errors="replace")


def _ended(pod: Obj, container: str) -> str:
    """`Failed, exit 137 OOMKilled`: how the pod and its container ended."""
    phase = pod.get("status", {}).get("phase") or "Unknown"
    for status in pod.get("status", {}).get("containerStatuses") or []:
        done = (status.get("state") or {}).get("terminated")
        if status.get("name") == container and done:
            return f"{phase}, exit {done.get('exitCode')} {done.get('reason') or ''}".rstrip()
    return phase


def save(texts: dict[int, str], when: str, stores: list[Callable[[], ObjectStore]]) -> Saved:
    """Write the logs to the first store that takes them (the run's storage, then the local
    folder); the problems of those that did not."""
    problems: list[str] = []
    for open_one in stores:
        try:
            store = open_one()
            for node, text in sorted(texts.items()):
                store.put_bytes(pod_logs_key(when, node), text.encode())
            return Saved(store.url(pod_logs_key(when, 0)).rpartition("/")[0] + "/", (*problems,))
        except Exception as err:  # noqa: BLE001 - any store failure: try the next one
            problems.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
    return Saved(None, tuple(problems))


def saved_lines(stores: list[Callable[[], ObjectStore]], node: int) -> Iterator[str]:
    """The saved logs of node `node`, oldest replacement first, from every store that has
    some; a line saying why a store could not be read."""
    found: list[tuple[str, ObjectStore, str]] = []
    for open_one in stores:
        try:
            store = open_one()
            for info in store.list(f"{POD_LOGS}/"):
                parsed = parse_pod_logs_key(info.key)
                if parsed is not None and parsed[1] == node:
                    found.append((parsed[0], store, info.key))
        except FileNotFoundError:
            continue
        except Exception as err:  # noqa: BLE001 - the saved logs are best effort
            yield f"(saved logs of replaced workloads unreadable: {str(err).splitlines()[0]})"
    for _, store, key in sorted(found, key=lambda f: f[0]):
        try:
            yield from store.get_bytes(key).decode("utf-8", errors="replace").splitlines()
        except Exception as err:  # noqa: BLE001
            yield f"(cannot read {store.url(key)}: {str(err).splitlines()[0]})"


def opener(uri: str, storage: Any = None) -> Callable[[], ObjectStore]:
    """A deferred `open_store` (a store that cannot be opened fails where it is used)."""
    return lambda: open_store(uri, storage)
