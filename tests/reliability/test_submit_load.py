"""Submit under load against the fake API server: 100 concurrent submits of one config make
exactly one Job (+ its ConfigMap); 100 distinct configs make 100 Jobs, none lost or doubled.
The fast tier runs both with 10 (a few seconds for 100).
Each thread has its own backend, like 100 CLI invocations; creates are atomic on the API
(409 AlreadyExists), which is what the backend relies on."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from k8s_fake import FakeKube
from kube_configs import make_config
from relsupport import figure

from kubetune.config import PipelineConfig
from launcher.backends.base import SubmitResult
from launcher.backends.kubernetes import KubernetesBackend
from launcher.manifests import job_name

N = [10, pytest.param(100, marks=pytest.mark.slow)]


def _submit_all(kubeconfig: Path, configs: list[PipelineConfig]) -> list[SubmitResult]:
    def one(cfg: PipelineConfig) -> SubmitResult:
        return KubernetesBackend(kubeconfig=str(kubeconfig), namespace="default").submit(cfg)

    with ThreadPoolExecutor(max_workers=len(configs)) as pool:
        return list(pool.map(one, configs, timeout=240))


def _objects(fake: FakeKube, plural: str) -> list[str]:
    with fake.cond:
        return sorted(name for (p, _, name) in fake.objects if p == plural)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", N)
def test_same_config_n_times_makes_one_job(fake_kube: tuple[FakeKube, Path], n: int) -> None:
    fake, kubeconfig = fake_kube
    cfg = make_config(name="load-same")
    started = time.monotonic()
    results = _submit_all(kubeconfig, [cfg] * n)
    elapsed = time.monotonic() - started
    created = sum(r.created for r in results)
    jobs, config_maps = _objects(fake, "jobs"), _objects(fake, "configmaps")
    assert created == 1, f"{created} submits claim to have created the Job"
    assert jobs == [job_name(cfg)] and config_maps == [job_name(cfg)]
    assert {r.job_name for r in results} == {job_name(cfg)}
    figure(
        "submit same config",
        f"{n} concurrent submits -> {len(jobs)} Job, "
        f"{len(config_maps)} ConfigMap, {created} 'created' "
        f"({elapsed:.1f}s)",
    )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("n", N)
def test_n_distinct_configs_make_n_jobs(fake_kube: tuple[FakeKube, Path], n: int) -> None:
    fake, kubeconfig = fake_kube
    configs = [make_config(name=f"load-{i:03d}") for i in range(n)]
    started = time.monotonic()
    results = _submit_all(kubeconfig, configs)
    elapsed = time.monotonic() - started
    jobs = _objects(fake, "jobs")
    expected = sorted(job_name(c) for c in configs)
    doubled = [n for n, k in Counter(r.job_name for r in results).items() if k > 1]
    assert all(r.created for r in results) and doubled == []
    lost, extra = set(expected) - set(jobs), set(jobs) - set(expected)
    assert jobs == expected, f"lost: {lost}, extra: {extra}"
    assert _objects(fake, "configmaps") == expected
    figure(
        "submit distinct configs",
        f"{n} concurrent submits -> {len(jobs)} Jobs, "
        f"{len(set(expected) - set(jobs))} lost, {len(doubled)} "
        f"doubled ({elapsed:.1f}s)",
    )
