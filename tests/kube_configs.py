"""Config variants shared by the manifest and Kubernetes backend tests (pure data)."""

from __future__ import annotations

from typing import Any

import yaml

from kubetune.config import PipelineConfig, parse_config

# Test credentials: these strings must never appear in any rendered manifest.
TEST_ACCESS_KEY = "AKIATESTKEYNEVERSHOWN"
TEST_SECRET_KEY = "s3cr3t-value-never-in-manifests"
TEST_HF_TOKEN = "hf_tokenValueNeverInManifests"

_STORAGE = {
    "endpoint_url": "http://minio.kubetune:9000",
    "bucket": "kubetune",
    "region": "us-east-1",
    "credentials_secret": {"name": "s3-credentials"},
}
_LORA_LOADER = {
    "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "s3://kubetune/data/cats"}
}
_TI_LOADER = {
    "dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": "s3://kubetune/data/cat"},
    "caption_preset": "object",
}


def config_dict(kind: str = "SD_LORA", **job: Any) -> dict[str, Any]:
    """A valid config of `kind` with a `job:` section built from keyword arguments."""
    data: dict[str, Any] = {
        "type": kind,
        "base_output_dir": "output/my-run",
        "max_train_steps": 100,
        "save_every_n_steps": 50,
        "storage": dict(_STORAGE),
        "job": {"name": "my-run", **job},
    }
    if "TEXTUAL_INVERSION" in kind:
        data.update(placeholder_token="<cat>", initializer_token="cat", data_loader=_TI_LOADER)
    else:
        data["data_loader"] = _LORA_LOADER
    return data


def with_storage(data: dict[str, Any], **storage: Any) -> dict[str, Any]:
    """``data`` with its ``storage:`` section replaced by ``storage``."""
    return {**data, "storage": storage}


def make_config(kind: str = "SD_LORA", **job: Any) -> PipelineConfig:
    return parse_config(yaml.safe_dump(config_dict(kind, **job)))


VARIANTS: dict[str, dict[str, Any]] = {
    "sd-lora-defaults": config_dict(),
    "sdxl-lora-multi-gpu": config_dict(
        "SDXL_LORA",
        gpus=4,
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        priority_class_name="training",
        active_deadline_seconds=86400,
        hf_token_secret={"name": "hf", "key": "HF_TOKEN"},
    ),
    "sd-ti-kueue": config_dict(
        "SD_TEXTUAL_INVERSION",
        queue_name="gpu-queue",
        service_account="kubetune-runner",
        labels={"team": "vision"},
    ),
    "sdxl-ti-cpu-only": config_dict(
        "SDXL_TEXTUAL_INVERSION",
        gpus=0,
        cpu="500m",
        memory=None,
        ttl_seconds_after_finished=None,
        env={"LOG_LEVEL": "debug"},
    ),
    "sdxl-lora-ti-amd": config_dict(
        "SDXL_LORA_AND_TEXTUAL_INVERSION",
        gpus=2,
        gpu_resource_name="amd.com/gpu",
        backoff_limit=0,
        image="registry.example.com/kubetune:0.1.0",
        image_pull_policy="Always",
        tolerations=[
            {"key": "gpu", "value": "yes", "effect": "NoExecute", "toleration_seconds": 60}
        ],
    ),
    "sd-lora-gcs-secret": with_storage(
        config_dict(), provider="gcs", bucket="kubetune", credentials_secret={"name": "gcs-key"}
    ),
    "sd-lora-gke-workload-identity": with_storage(
        config_dict(service_account="kubetune-runner"),
        provider="gcs",
        bucket="kubetune",
        workload_identity=True,
    ),  # fmt: skip
    "sd-lora-azure-secret": with_storage(
        config_dict(),
        provider="azure",
        bucket="kubetune",
        account_name="kubetunedata",
        credentials_secret={"name": "azure-key"},
    ),  # fmt: skip
    "sd-lora-azure-workload-identity": with_storage(
        config_dict(service_account="kubetune-runner"),
        provider="azure",
        bucket="kubetune",
        account_name="kubetunedata",
        workload_identity=True,
    ),  # fmt: skip
    "sd-lora-eks-irsa": with_storage(
        config_dict(service_account="kubetune-runner"),
        bucket="kubetune",
        region="eu-west-1",
        addressing_style="virtual",
        workload_identity=True,
    ),  # fmt: skip
}
