"""Helpers for the training tests: small real datasets, configs for every type on the
tiny models, an in-process ``train`` that resets accelerate, ``python -m runner`` preempted by
SIGTERM and resumed, and readers of what a run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from kubetune.config import PipelineConfig, parse_config
from kubetune.errors import EXIT_PREEMPTED

REPO = Path(__file__).resolve().parents[1]
SIDE = 64
TYPES = (
    "SD_LORA",
    "SDXL_LORA",
    "SD_TEXTUAL_INVERSION",
    "SDXL_TEXTUAL_INVERSION",
    "SDXL_LORA_AND_TEXTUAL_INVERSION",
    "SDXL_FINETUNE",
)
PLACEHOLDER = "<kbtn>"
BUCKETS = {"target_resolution": SIDE, "start_dim": 32, "end_dim": 128, "divisible_by": 32}
"""Aspect-ratio buckets from 32 to 128 px around SIDE (``streaming_loader``'s)."""


def write_dataset(root: Path, n: int = 4, seed: int = 0) -> Path:
    """``n`` smooth colour images (64×64) with ``.txt`` captions."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    for i in range(n):
        colour = rng.uniform(0, 1, 3)
        pixels = np.stack(
            [np.clip(colour[c] * (0.5 + 0.5 * (xx if c % 2 else yy)), 0, 1) for c in range(3)],
            axis=-1,
        )
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / f"img-{i}.png")
        (root / f"img-{i}.txt").write_text(f"a kbtn picture number {i}")
    return root


def s3_dataset(root: Path, bucket: str) -> str:
    """``write_dataset``'s 4 images, written under ``root`` and uploaded to
    ``s3://BUCKET/datasets/kbtn`` (the AWS_* environment pointing at the server): that URI."""
    from kubetune.storage import open_store

    uri = f"s3://{bucket}/datasets/kbtn"
    store = open_store(uri)
    for path in sorted(write_dataset(root).iterdir()):
        store.put_file(path.name, path)
    return uri


def training_images(n: int = 4) -> Any:
    """A module-scoped ``data_dir`` fixture: ``write_dataset``'s ``n`` images, written once
    for the test module that assigns it (``data_dir = training_images(n=2)``)."""

    @pytest.fixture(scope="module")
    def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
        return write_dataset(tmp_path_factory.mktemp("data") / "images", n=n)

    return data_dir


def caption_loader(data_dir: Path | str, **fields: Any) -> dict[str, Any]:
    """An ``IMAGE_CAPTION_SD_DATA_LOADER`` section over a folder of images with ``.txt``
    captions: SIDE px, centre crop, no flip, unless ``fields`` say otherwise."""
    return {
        "type": "IMAGE_CAPTION_SD_DATA_LOADER",
        "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(data_dir)},
        "resolution": SIDE,
        "center_crop": True,
        "random_flip": False,
        **fields,
    }


def streaming_loader(data_dir: Path | str, **fields: Any) -> dict[str, Any]:
    """``caption_loader`` with ``BUCKETS`` in the streaming order (batches form as the sizes
    stream in), unless ``fields`` say otherwise."""
    return caption_loader(data_dir, aspect_ratio_buckets=BUCKETS | {"order": "streaming"}, **fields)


def make_config(
    kind: str, model_dir: Path, data_dir: Path, out_dir: Path, **overrides: Any
) -> PipelineConfig:
    """A fast CPU config of type ``kind`` (float32, 64×64, batch 2)."""
    ti = "TEXTUAL_INVERSION" in kind
    data = caption_loader(data_dir)
    if ti:
        data.update(type="TEXTUAL_INVERSION_SD_DATA_LOADER", caption_preset="object")
    if kind == "FLUX_LORA":
        data.update(type="IMAGE_CAPTION_FLUX_DATA_LOADER")
    raw: dict[str, Any] = {
        "type": kind,
        "seed": 7,
        "base_output_dir": str(out_dir),
        "model": str(model_dir),
        "hf_variant": None,
        "weight_dtype": "float32",
        "mixed_precision": "no",
        "report_to": None,
        "data_loader": data,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "save_every_n_steps": 2,
        "optimizer": {"optimizer_type": "AdamW", "learning_rate": 1e-3},
        "num_validation_inference_steps": 3,
    }
    if ti:
        raw.update(placeholder_token=PLACEHOLDER, initializer_token="cat", num_vectors=2)
    if kind == "FLUX_LORA":  # short T5 sequences keep the tiny model fast
        raw.update(t5_tokenizer_max_length=16, lr_warmup_steps=0, lr_scheduler="constant")
    if kind == "SDXL_LORA_AND_TEXTUAL_INVERSION":
        raw.update(ti_train_steps_ratio=0.5, textual_inversion_learning_rate=1e-2)
    raw.update(overrides)
    return parse_config(yaml.safe_dump(raw))


def config_file(cfg: PipelineConfig, path: Path) -> Path:
    from kubetune.config import config_to_yaml

    path.write_text(config_to_yaml(cfg))
    return path


def load_pipeline(cfg: PipelineConfig, total_steps: int = 4) -> tuple[Any, Any]:
    """(base model components, training pipeline) of ``cfg`` on the CPU, nothing trained."""
    import torch

    from runner.models.loading import load_model
    from runner.pipelines import build_pipeline
    from runner.session.settings import model_settings

    comps = load_model(model_settings(cfg))
    return comps, build_pipeline(cfg, comps, torch.device("cpu"), total_steps=total_steps)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def train(cfg: PipelineConfig, **kwargs: Any) -> Any:
    """``runner.session.run.run`` in this process, with accelerate's singletons reset first."""
    from runner.session.run import run

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    reset_accelerate()
    return run(cfg, **kwargs)


def step_dirs(out_dir: Path) -> list[str]:
    """Checkpoint folders that have a manifest (published)."""
    root = out_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").exists())


def model_for(kind: str, request: pytest.FixtureRequest) -> Path:
    """The tiny base model of type ``kind`` (``tiny_sdxl_dir`` for SDXL types, else SD 1.5)."""
    return request.getfixturevalue("tiny_sdxl_dir" if "SDXL" in kind else "tiny_sd_dir")


def checkpoint_weights(out_dir: Path, step: int) -> dict[str, Any]:
    """The trainable tensors of the run's checkpoint at ``step``."""
    from safetensors.torch import load_file

    return load_file(out_dir / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")


def sample_latents(pipe: Any, prompt: str = "a kbtn picture") -> Any:
    """A diffusers pipeline's latents for ``prompt``: 2 steps at 64x64, seed 0."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator,
               output_type="latent")  # fmt: skip
    return out.images


def start_runner(config: Path, out_dir: Path) -> subprocess.Popen[str]:
    """``python -m runner CONFIG`` as a pod runs it (DEBUG log on stderr, a work folder of its
    own beside ``out_dir``)."""
    env = {**os.environ, "KUBETUNE_LOG_LEVEL": "DEBUG", "PYTHONPATH": str(REPO),
           "KUBETUNE_WORK_DIR": str(out_dir.parent / f"work-{out_dir.name}")}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "runner", str(config)],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def preempt_at_step(config: Path, out_dir: Path, step: int = 3) -> None:
    """Run the runner, SIGTERM it once it logs step ``step`` done; it must exit as preempted."""
    proc = start_runner(config, out_dir)
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if f"step {step} done" in line:
            proc.send_signal(signal.SIGTERM)
            break
    log += proc.stderr.readlines()
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, "".join(log[-20:])
    # a planned stop, not a failure: its last line names the checkpoint and says no "error"
    last = [line for line in log if line.strip()][-1]
    assert last.startswith("kubetune: stopped by SIGTERM after step "), last
    assert "error" not in last and "published); resume by rerunning" in last, last


RESUME_FIELDS: dict[str, Any] = {"max_train_steps": 6, "save_every_n_steps": 100,
                                 "gradient_accumulation_steps": 2, "lr_scheduler": "cosine",
                                 "lr_warmup_steps": 2, "max_grad_norm": 1.0}  # fmt: skip
"""What ``stopped_and_resumed`` trains: 6 steps, gradient accumulation, warm-up + cosine,
clipping, no scheduled checkpoint."""


def stopped_and_resumed(
    kind: str, model_dir: Path, data_dir: Path, tmp_path: Path, **fields: Any
) -> tuple[Path, Path]:
    """``kind`` trained with ``RESUME_FIELDS`` (and ``fields``) twice: to the end in this
    process (``tmp_path/ref``), and as a pod runs it (``tmp_path/run``), stopped by SIGTERM
    after step 3 (exit 143, its one stop checkpoint published, the run ``preempted``) and
    started again to the end. The two output folders, (uninterrupted, resumed)."""
    fields = {**RESUME_FIELDS, **fields}
    reference, out = tmp_path / "ref", tmp_path / "run"
    train(make_config(kind, model_dir, data_dir, reference, **fields))
    config = config_file(make_config(kind, model_dir, data_dir, out, **fields),
                         tmp_path / "run.yaml")  # fmt: skip
    preempt_at_step(config, out)
    steps = step_dirs(out)
    assert len(steps) == 1 and 3 <= int(steps[0][5:]) < fields["max_train_steps"], steps
    assert json.loads((out / "progress.json").read_text())["state"] == "preempted"
    resume_to_end(config, out)
    return reference, out


def resume_to_end(config: Path, out_dir: Path) -> str:
    """Run the runner again: it must resume from a checkpoint and finish. Its stderr."""
    resumed = start_runner(config, out_dir)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert "resumed from checkpoint" in err
    return err
