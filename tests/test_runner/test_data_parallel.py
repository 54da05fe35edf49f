"""The data-parallel contract (issue #23): the trained weights do not depend on how the global
batch is split. ``torchrun --nproc_per_node 2`` (gloo, CPU) with ``train_batch_size`` b
trains the model ``python -m runner`` trains with 2·b, on the same data: the same global
batches in the same order, and the per-example noise, timesteps and dropouts drawn for the
whole global batch (each rank keeps its rows), so no draw depends on the rank. A checkpoint
written by 2 processes resumes on 1 and on 4, and the end matches the uninterrupted run.

The bound is a tenth of one optimizer step: the largest weight change of the last step of the
single-process run, measured in the test itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from dp_support import max_diff, ok, single, torchrun
from train_support import checkpoint_weights, config_file, make_config, write_dataset

pytest_plugins = ["fixtures_models"]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
KNOBS: dict[str, Any] = {
    "lora_dropout": 0.2,
    "noise_offset": 0.05,
    "input_perturbation": 0.1,
    "gradient_accumulation_steps": 2,
}


def _configs(
    tmp_path: Path, model: Path, steps: int, per_process: int, world: int, **fields: Any
) -> tuple[Path, Path]:
    """(config file, output dir) with a global batch of per_process × world."""
    data = write_dataset(tmp_path / "data", n=8)
    out = tmp_path / f"out-{world}x{per_process}-{steps}"
    loader = {"caption_dropout_rate": 0.3}
    cfg = make_config("SD_LORA", model, data, out, train_batch_size=per_process,
                      max_train_steps=steps, save_every_n_steps=1, **fields)  # fmt: skip
    raw = cfg.model_dump(mode="json", exclude_unset=True)
    raw["data_loader"].update(loader)
    from kubetune.config import parse_config

    cfg = parse_config(json.dumps(raw))
    return config_file(cfg, tmp_path / f"{out.name}.yaml"), out


def _one_step(out: Path, step: int) -> float:
    """The largest weight change of optimizer step ``step``."""
    return max_diff(checkpoint_weights(out, step), checkpoint_weights(out, step - 1))


def test_two_processes_train_the_model_of_one_with_twice_the_batch(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    """2 × 2 with accumulation 2 vs 1 × 4: 4 steps over 8 images (global batches of 4),
    caption dropout, LoRA dropout, offset noise and input perturbation on."""
    one, out_one = _configs(tmp_path, tiny_sd_dir, 4, 4, 1, **KNOBS)
    two, out_two = _configs(tmp_path, tiny_sd_dir, 4, 2, 2, **KNOBS)
    ok(single(one))
    ok(torchrun(two))
    step = _one_step(out_one, 4)
    diff = max_diff(checkpoint_weights(out_two, 4), checkpoint_weights(out_one, 4))
    print(f"2x2 vs 1x4: max |dw| {diff:.3g}; one step {step:.3g}")
    assert step > 1e-4  # the runs train
    assert diff < 0.1 * step


def test_a_checkpoint_of_two_processes_resumes_on_one(tmp_path: Path, tiny_sd_dir: Path) -> None:
    """2 × 2 trains 3 steps (checkpoint step-3, mid-epoch: 8 images, global batch 4); the
    same run resumed by 1 × 4 to step 6 ends where 1 × 4 uninterrupted does. The data
    position is kept in examples seen, so the changed per-process batch size resumes. With
    gradient checkpointing (DDP's hooks and the recomputed forward's dropout masks)."""
    knobs = {"lora_dropout": 0.2, "gradient_checkpointing": True}  # masks redrawn alike
    ref, out_ref = _configs(tmp_path, tiny_sd_dir, 6, 4, 1, **knobs)
    two, out_two = _configs(tmp_path, tiny_sd_dir, 3, 2, 2, **knobs)
    ok(single(ref))
    ok(torchrun(two))
    raw = two.read_text().replace("train_batch_size: 2", "train_batch_size: 4")
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(raw.replace("max_train_steps: 3", "max_train_steps: 6"))
    log = ok(single(resumed)).stderr
    assert "resumed from checkpoint step-000003" in log
    step = _one_step(out_ref, 6)
    diff = max_diff(checkpoint_weights(out_two, 6), checkpoint_weights(out_ref, 6))
    print(f"2x2 resumed on 1x4 vs 1x4: max |dw| {diff:.3g}; one step {step:.3g}")
    assert diff < 0.1 * step


def test_a_checkpoint_of_two_processes_resumes_on_four(tmp_path: Path, tiny_sd_dir: Path) -> None:
    """2 × 2 trains 3 steps; the run resumed by 4 × 1 (the same global batch of 4) to step 6
    ends where 1 × 4 uninterrupted does."""
    ref, out_ref = _configs(tmp_path, tiny_sd_dir, 6, 4, 1, lora_dropout=0.2)
    two, out_two = _configs(tmp_path, tiny_sd_dir, 3, 2, 2, lora_dropout=0.2)
    ok(single(ref))
    ok(torchrun(two))
    raw = two.read_text().replace("train_batch_size: 2", "train_batch_size: 1")
    resumed = tmp_path / "resumed.yaml"
    resumed.write_text(raw.replace("max_train_steps: 3", "max_train_steps: 6"))
    log = ok(torchrun(resumed, nproc=4)).stderr
    assert "resumed from checkpoint step-000003" in log
    step = _one_step(out_ref, 6)
    diff = max_diff(checkpoint_weights(out_two, 6), checkpoint_weights(out_ref, 6))
    print(f"2x2 resumed on 4x1 vs 1x4: max |dw| {diff:.3g}; one step {step:.3g}")
    assert diff < 0.1 * step
