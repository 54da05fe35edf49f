"""Validation images as invoke-training makes them (issue #12).

Expected behaviour is invoke-training's ``_shared/stable_diffusion/validation.py``
(``generate_validation_images_sd`` / ``generate_validation_images_sdxl``, commit 99c673d), not
kubetune's code: the pipeline runs on the training DDPM noise scheduler itself, with the
pipeline's default guidance and 30 steps (kubetune: ``num_validation_inference_steps``,
absent 30); each prompt gets one generator seeded with ``seed`` (left unseeded when ``seed``
is null), and that prompt's images are drawn from it one after another; the size is
``data_loader.resolution`` (with aspect-ratio buckets too). The reference below is that loop
written against diffusers directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from train_support import load_pipeline, make_config, write_dataset

from kubetune.config import PipelineConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(120)
CPU = torch.device("cpu")
PROMPTS = ["a kbtn picture", "a red circle"]
NEGATIVES = ["blurry", "dark"]


def _reference(comps, cfg: PipelineConfig, side: int) -> list[list[np.ndarray]]:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = {"vae": comps.vae, "text_encoder": comps.text_encoder, "tokenizer": comps.tokenizer,
             "unet": comps.unet, "scheduler": comps.noise_scheduler}  # fmt: skip
    if comps.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    rows = []
    with torch.no_grad():
        for prompt, negative in zip(PROMPTS, NEGATIVES, strict=True):
            generator = torch.Generator(device=CPU)
            if cfg.seed is not None:
                generator = generator.manual_seed(cfg.seed)
            rows.append([
                np.asarray(pipe(prompt, num_inference_steps=cfg.num_validation_inference_steps,
                                generator=generator, height=side, width=side,
                                negative_prompt=negative).images[0])
                for _ in range(cfg.num_validation_images_per_prompt)
            ])  # fmt: skip
    return rows


@pytest.mark.parametrize(
    ("kind", "seed"),
    [
        ("SD_LORA", 7),
        pytest.param("SD_LORA", None, marks=pytest.mark.slow),
        pytest.param("SDXL_LORA", 3, marks=pytest.mark.slow),
    ],
)
def test_validation_images_are_the_ones_invoke_training_draws(
    kind: str, seed: int | None, tmp_path: Path, tiny_sd_dir: Path, tiny_sdxl_dir: Path
) -> None:
    from kubetune.storage import open_store
    from runner.session.settings import validation_settings
    from runner.training.validation import Validator

    model = tiny_sdxl_dir if kind == "SDXL_LORA" else tiny_sd_dir
    data = write_dataset(tmp_path / "data", n=2)
    cfg = make_config(kind, model, data, tmp_path / "out", seed=seed, validation_prompts=PROMPTS,
                      negative_validation_prompts=NEGATIVES, num_validation_images_per_prompt=2,
                      validate_every_n_steps=1)  # fmt: skip
    comps, pipeline = load_pipeline(cfg)
    store = open_store(str(tmp_path / "store"))
    Validator(validation_settings(cfg), pipeline, store, CPU).validate(1)
    pipeline.set_train(False)  # as during validation (no dropout either way here)
    expected = _reference(comps, cfg, side=64)
    for i, row in enumerate(expected):
        for j, image in enumerate(row):
            with Image.open(
                tmp_path / "store" / "validation" / "step-000001" / f"prompt-{i}-{j}.png"
            ) as got:
                assert np.array_equal(np.asarray(got.convert("RGB")), image), (i, j)


def test_validation_size_is_the_data_loaders_resolution(tmp_path: Path) -> None:
    from runner.session.settings import validation_settings

    buckets = {"target_resolution": 48, "start_dim": 32, "end_dim": 64, "divisible_by": 16}
    loader = {"type": "IMAGE_CAPTION_SD_DATA_LOADER", "resolution": 100,
              "aspect_ratio_buckets": buckets,
              "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "d"}}  # fmt: skip
    cfg = make_config("SD_LORA", tmp_path, tmp_path, tmp_path, data_loader=loader)
    s = validation_settings(cfg)
    assert (s.height, s.width) == (96, 96)  # 100 rounded down to a multiple of 8 for diffusers
    loader["resolution"] = [64, 128]
    s = validation_settings(
        make_config("SD_LORA", tmp_path, tmp_path, tmp_path, data_loader=loader)
    )
    assert (s.height, s.width, s.inference_steps) == (64, 128, 3)
    assert s.seed == 7  # the config's seed (null: an unseeded generator, as invoke-training)
