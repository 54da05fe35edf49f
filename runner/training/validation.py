"""Validation images: the trained weights in an inference pipeline, seeded per image, saved
as one PNG per image and a grid per validation step; training state restored afterwards."""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from kubetune.humanize import count
from kubetune.layout import thumb_key, validation_key
from kubetune.storage import ObjectStore
from runner.models.assemble import inference_pipeline
from runner.pipelines.base import TrainingPipeline
from runner.reporting.report import thumbnail_jpeg
from runner.training.cadence import Cadence
from runner.training.precision import vae_decode_outside_autocast

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ValidationSettings:
    """How validation images are made, as invoke-training makes them
    (``_shared/stable_diffusion/validation.py``): ``seed`` is the config's (None: an
    unseeded generator), size ``data_loader.resolution``, ``inference_steps`` 30 unless set."""

    prompts: list[str]
    negative_prompts: list[str] | None
    images_per_prompt: int
    cadence: Cadence
    cpu_offload: bool
    seed: int | None
    height: int
    width: int
    inference_steps: int = 30
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)
    """Further arguments of every pipeline call (FLUX: ``max_sequence_length`` and, with
    negative prompts, ``true_cfg_scale``)."""

    def due(self, step: int, completed_epoch: int | None) -> bool:
        return bool(self.prompts) and self.cadence.due(step, completed_epoch)


def grid(images: list[list[Image.Image]]) -> Image.Image:
    """Rows = prompts, columns = images of that prompt."""
    w, h = images[0][0].size
    out = Image.new("RGB", (w * max(len(r) for r in images), h * len(images)))
    for i, row in enumerate(images):
        for j, image in enumerate(row):
            out.paste(image, (j * w, i * h))
    return out


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Validator:
    """Generates validation images when due (main process only)."""

    def __init__(
        self,
        settings: ValidationSettings,
        pipeline: TrainingPipeline,
        store: ObjectStore | None,
        device: torch.device,
        on_images: Callable[[int, list[list[Image.Image]]], None] | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self.s, self.pipeline, self.store, self.device = settings, pipeline, store, device
        self.on_images = on_images
        """Also called with (step, images per prompt), e.g. to log them to TensorBoard."""
        self.autocast = autocast
        """Around each image, as around each training step (``accelerator.autocast``, as
        invoke-training generates its validation images)."""

    def due(self, step: int, completed_epoch: int | None) -> bool:
        """Whether validation is due after ``step`` (on every rank alike; only the main
        process, which has the store, generates)."""
        return self.s.due(step, completed_epoch)

    def maybe_validate(self, step: int, completed_epoch: int | None) -> bool:
        if self.store is None or not self.s.due(step, completed_epoch):
            return False
        self.validate(step)
        return True

    def missing(self, step: int, completed_epoch: int | None) -> bool:
        """Whether ``step``'s validation was due but is not in the store (its grid, written
        last, is absent): the run stopped while validating, after that step's checkpoint."""
        if self.store is None or step == 0 or not self.s.due(step, completed_epoch):
            return False
        return not self.store.exists(validation_key(step, "grid.png"))

    def validate(self, step: int) -> list[str]:
        """Write ``validation/step-XXXXXX/prompt-I-J.png`` and ``grid.png``; return keys."""
        assert self.store is not None
        started = time.perf_counter()
        log.info("validation at step %d: generating images for %s", step,
                 count(len(self.s.prompts), "prompt"))  # fmt: skip
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.pipeline.set_train(False)
        try:
            with self.pipeline.averaged():
                images = self._generate()
        finally:
            self.pipeline.set_train(True)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
        prefix = validation_key(step)
        keys = []
        for i, row in enumerate(images):
            for j, image in enumerate(row):
                keys.append(f"{prefix}/prompt-{i}-{j}.png")
                self.store.put_bytes(keys[-1], png_bytes(image))
        for i, row in enumerate(images):
            self.store.put_bytes(thumb_key(step, i), thumbnail_jpeg(row))
        self.store.put_bytes(f"{prefix}/grid.png", png_bytes(grid(images)))
        if self.on_images is not None:
            self.on_images(step, images)
        grid_url = self.store.url(f"{prefix}/grid.png")
        seconds = time.perf_counter() - started
        log.info("validation at step %d done in %.1f s: %s, %s", step, seconds,
                 count(len(keys), "image"), grid_url)  # fmt: skip
        return [*keys, f"{prefix}/grid.png"]

    @torch.no_grad()
    def _generate(self) -> list[list[Image.Image]]:
        pipe = inference_pipeline(self.pipeline.comps)
        offload = self.s.cpu_offload and self.device.type == "cuda"
        if offload:
            pipe.enable_model_cpu_offload(device=self.device)
        try:
            with vae_decode_outside_autocast(pipe.vae):
                return [self._images(pipe, i) for i in range(len(self.s.prompts))]
        finally:
            if offload:
                pipe.remove_all_hooks()
                for module in pipe.components.values():
                    if isinstance(module, torch.nn.Module):
                        module.to(self.device)

    def _images(self, pipe: Any, i: int) -> list[Image.Image]:
        """Prompt ``i``'s images, drawn one after another from one generator (seeded with
        the config's seed; unseeded when it has none), as invoke-training draws them."""
        negatives = self.s.negative_prompts
        generator = torch.Generator(self.device)
        if self.s.seed is not None:
            generator = generator.manual_seed(self.s.seed)
        images = []
        for _ in range(self.s.images_per_prompt):
            with self.autocast():
                images.append(
                    pipe(
                        self.s.prompts[i],
                        negative_prompt=negatives[i] if negatives else None,
                        num_inference_steps=self.s.inference_steps,
                        generator=generator,
                        height=self.s.height,
                        width=self.s.width,
                        **self.s.pipeline_kwargs,
                    ).images[0]
                )
        return images
