"""Offline validation against the JobSet and TrainJob CRD schemas (`jsonschema`), strict.

The CRD files are fetched upstream data, not committed here (the search tool's `fetch`
terms keep fetched files out of developers' commits): the tests read them from
$KUBETUNE_CRD_DIR, else `<repo>/shared/crds/`, and skip naming both when absent. The files,
unmodified:
- `jobset.x-k8s.io_jobsets.yaml`: kubernetes-sigs/jobset
  `config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml`
  at 08dfbdfd682714a9ab929633eca8dc95315187e7
- `trainer.kubeflow.org_trainjobs.yaml`: kubeflow/trainer
  `manifests/base/crds/trainer.kubeflow.org_trainjobs.yaml`
  at 8c0f5059bd51ec3ba6d6a6a7b2e1471de7bc13b3
- `torch_distributed.yaml`: kubeflow/trainer `manifests/base/runtimes/torch_distributed.yaml`
  at the same commit (the `torch-distributed` ClusterTrainingRuntime).

"Strict" as kubernetes-validate's strict mode: an object schema with `properties` gets
`additionalProperties: false` unless it says `x-kubernetes-preserve-unknown-fields`, so an
unknown or misspelt field is an error instead of being pruned by the API server. CEL rules
(`x-kubernetes-validations`) are not evaluated: the tests check the ones that matter to us
(names) themselves.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CRD_FILES = {
    "JobSet": "jobset.x-k8s.io_jobsets.yaml",
    "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
}
RUNTIME_FILE = "torch_distributed.yaml"


def crd_dir() -> Path:
    env = os.environ.get("KUBETUNE_CRD_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "shared" / "crds"


def _load(name: str) -> Any:
    path = crd_dir() / name
    if not path.is_file():
        pytest.skip(
            f"{name} not found in {crd_dir()}: put the upstream CRD files there or set "
            "KUBETUNE_CRD_DIR (see tests/crd_schemas.py)"
        )
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(), Loader=loader)  # noqa: S506 - a safe loader


def _strict(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


@functools.cache
def _validator(kind: str) -> jsonschema.Draft7Validator:
    crd = _load(CRD_FILES[kind])
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served", True)][:1]
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    return jsonschema.Draft7Validator(schema)


def crd_api_version(kind: str) -> str:
    crd = _load(CRD_FILES[kind])
    return f"{crd['spec']['group']}/{crd['spec']['versions'][0]['name']}"


def crd_errors(obj: dict[str, Any]) -> list[str]:
    """Every schema error of a JobSet / TrainJob object, as `path: message`."""
    errors = _validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def torch_runtime() -> dict[str, Any]:
    """Kubeflow's `torch-distributed` ClusterTrainingRuntime."""
    return _load(RUNTIME_FILE)
