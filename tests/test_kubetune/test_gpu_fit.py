"""`launcher validate` warns when a FLUX_LORA run clearly will not fit the Job's GPU, from
`job.gpu_memory_gib` or the GPU product in a node selector; no GPU named, no warning."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.config import parse_config
from kubetune.config.gpu_fit import flux_lora_gib, gpu_fit_warnings, product_memory_gib
from launcher.config_files import validate_file

SAMPLE = Path(__file__).parents[1] / "data" / "invoke_training_samples" / "flux_lora_1x40gb.yaml"


def _sample(**changes: Any) -> Any:
    raw = yaml.safe_load(SAMPLE.read_text())
    raw.update(changes)
    return parse_config(yaml.safe_dump(raw))


@pytest.mark.parametrize(
    ("product", "gib"),
    [
        ("NVIDIA-A100-SXM4-40GB", 40),
        ("NVIDIA-H100-80GB-HBM3", 80),
        ("NVIDIA-A10G", 24),
        ("Tesla-T4", 16),
        ("NVIDIA-L40S", 48),
        ("NVIDIA-Mystery", None),
    ],
)
def test_product_labels_give_memory(product: str, gib: float | None) -> None:
    assert product_memory_gib(product) == gib


def test_invoke_trainings_40gb_sample_fits_40_not_24() -> None:
    need = sum(flux_lora_gib(_sample()).values())
    assert 32 < need < 40  # what its name promises, and more than a 32 GB card
    assert gpu_fit_warnings(_sample(job={"gpu_memory_gib": 40})) == []
    (line,) = gpu_fit_warnings(_sample(job={"gpu_memory_gib": 24}))
    assert line.startswith("job: FLUX_LORA needs about 38 GiB") and "has 24 GiB" in line
    assert "cache_text_encoder_outputs: true" in line


def test_cached_text_encoders_fit_a_smaller_gpu_if_validation_offloads() -> None:
    assert gpu_fit_warnings(_sample(job={"gpu_memory_gib": 30})) != []
    cached = _sample(job={"gpu_memory_gib": 30}, cache_text_encoder_outputs=True)
    (line,) = gpu_fit_warnings(cached)  # validation brings T5 back to the GPU
    assert "text encoders (validation)" in line
    offload = _sample(
        job={"gpu_memory_gib": 30},
        cache_text_encoder_outputs=True,
        enable_cpu_offload_during_validation=True,
    )
    assert gpu_fit_warnings(offload) == []


def test_node_selector_product_is_read_and_validate_prints_it(tmp_path: Path) -> None:
    raw = yaml.safe_load(SAMPLE.read_text())
    raw["job"] = {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A10G"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = validate_file(str(path), local_data=False)  # the dataset is not the point here
    assert result.valid and any("the GPU has 24 GiB" in w for w in result.warnings)


def test_no_gpu_named_or_tiny_model_means_no_warning() -> None:
    assert gpu_fit_warnings(_sample()) == []
    tiny = _sample(model="builtin:tiny-flux", job={"gpu_memory_gib": 1})
    assert gpu_fit_warnings(tiny) == []
