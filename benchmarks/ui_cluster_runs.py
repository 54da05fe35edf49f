"""The runs page's cluster listing (`launcher.ui.runs.Runs.listing`, i.e.
KubernetesBackend.list) for N submitted runs, against the in-process fake API server of the
tests (tests/k8s_fake.py: real HTTP/JSON, the real `kubernetes` client), with the number of
API requests one listing makes. No timing assertions: figures for docs/benchmarks.md.

Usage: python benchmarks/ui_cluster_runs.py [--runs 50] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from k8s_fake import FakeKube
    from kube_configs import make_config
    from kubernetes import client, config

    from launcher.backends.kubernetes import KubernetesBackend
    from launcher.backends.local import LocalBackend
    from launcher.ui.runs import Runs

    work = Path(tempfile.mkdtemp(prefix="kubetune-ui-k8s-bench-"))
    with FakeKube() as fake:
        kubeconfig = str(fake.write_kubeconfig(work / "kubeconfig"))
        core = client.CoreV1Api(config.new_client_from_config(config_file=kubeconfig))
        data = {"AWS_ACCESS_KEY_ID": "eA==", "AWS_SECRET_ACCESS_KEY": "eA=="}
        core.create_namespaced_secret("default", {"metadata": {"name": "s3-credentials"},
                                                  "data": data})  # fmt: skip
        backend = KubernetesBackend(kubeconfig=kubeconfig)
        for i in range(args.runs):
            backend.submit(make_config("SD_LORA", name=f"run-{i:03d}"))
        runs = Runs(local=LocalBackend(work / "home"))
        runs._cluster, runs._cluster_tried = backend, time.monotonic()  # this cluster, no retry
        times, requests = [], 0
        for _ in range(args.repeat):
            before = len(fake.requests)
            start = time.perf_counter()
            rows = runs.listing()["runs"]
            times.append(time.perf_counter() - start)
            requests = len(fake.requests) - before
    print(f"cluster listing of {len(rows)} runs: median {statistics.median(times):.3f} s, "
          f"min {min(times):.3f} s, {requests} API requests")  # fmt: skip
    print(f"machine load (1-min average): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
