"""`launcher validate`'s GPU-fit warning for SDXL_FINETUNE (issue #25): invoke-training's two
"1x24gb" samples fit 24 GB as written; the settings that do not (float32 AdamW, fp32 master
weights) warn on a 24 GB GPU and name the fix; bigger GPUs take them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.config import parse_config
from kubetune.config.gpu_fit import gpu_fit_warnings, sdxl_finetune_gib
from launcher.config_files import validate_file

SAMPLES = Path(__file__).parents[1] / "data" / "invoke_training_samples"
ROBOCATS = SAMPLES / "sdxl_finetune_robocats_1x24gb.yaml"


def _sample(path: Path = ROBOCATS, **changes: Any) -> Any:
    raw = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if key == "optimizer":
            raw["optimizer"].update(value)
        else:
            raw[key] = value
    return parse_config(yaml.safe_dump(raw))


@pytest.mark.parametrize("name", ["robocats", "baroque"])
def test_both_samples_fit_the_24gb_their_names_promise(name: str) -> None:
    cfg = _sample(SAMPLES / f"sdxl_finetune_{name}_1x24gb.yaml", job={"gpu_memory_gib": 24})
    need = sum(sdxl_finetune_gib(cfg).values())
    assert 16 < need < 24, need  # more than a 16 GB card, within 24
    assert gpu_fit_warnings(cfg) == []
    assert gpu_fit_warnings(_sample(job={"gpu_memory_gib": 16})) != []


def test_float32_adamw_warns_on_24gb_and_names_8bit() -> None:
    cfg = _sample(optimizer={"use_8bit": False}, job={"gpu_memory_gib": 24})
    (line,) = gpu_fit_warnings(cfg)
    assert line.startswith("job: SDXL_FINETUNE needs about") and "optimizer " in line
    assert "optimizer.use_8bit: true" in line


def test_fp32_master_weights_with_adamw_need_an_80gb_class_gpu() -> None:
    cfg = _sample(mixed_precision="bf16", optimizer={"use_8bit": False})
    need = sum(sdxl_finetune_gib(cfg).values())
    assert 40 < need < 80, need
    (line,) = gpu_fit_warnings(_sample(mixed_precision="bf16", optimizer={"use_8bit": False},
                                       job={"gpu_memory_gib": 40}))  # fmt: skip
    assert "mixed_precision: no" in line
    assert gpu_fit_warnings(_sample(mixed_precision="bf16", optimizer={"use_8bit": False},
                                    job={"gpu_memory_gib": 80})) == []  # fmt: skip


def test_validate_prints_the_warning_from_a_node_selector(tmp_path: Path) -> None:
    raw = yaml.safe_load(ROBOCATS.read_text())
    raw["optimizer"]["use_8bit"] = False
    raw["job"] = {"node_selector": {"nvidia.com/gpu.product": "NVIDIA-A10G"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = validate_file(str(path), local_data=False)  # the dataset is not the point here
    assert result.valid and any("the GPU has 24 GiB" in w for w in result.warnings)
