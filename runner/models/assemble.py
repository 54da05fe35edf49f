"""The training components as a diffusers pipeline: the same modules (no copies) in the slots
diffusers names, for validation images and for an exported pipeline's ``model_index.json``."""

from __future__ import annotations

from typing import Any

from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from runner.models.loading import Components


def inference_pipeline(comps: Components) -> Any:
    """A diffusers pipeline over the training modules (no copies) and a copy of the training
    noise scheduler (invoke-training samples with the training DDPM scheduler itself);
    SD1.5, SDXL or FLUX (``FluxComponents``) by the components; no progress bar."""
    if getattr(comps, "is_flux", False):
        return _flux_pipeline(comps)
    shared = {
        "vae": comps.vae,
        "text_encoder": comps.text_encoder,
        "tokenizer": comps.tokenizer,
        "unet": comps.unet,
        "scheduler": _scheduler_copy(comps),
    }
    if comps.is_sdxl:
        pipe = StableDiffusionXLPipeline(
            **shared, text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2
        )
    else:
        pipe = StableDiffusionPipeline(
            **shared, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_pipeline(comps: Any) -> Any:
    """FluxPipeline over the training modules, as invoke-training's validation builds it."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(
        vae=comps.vae,
        text_encoder=comps.text_encoder,
        text_encoder_2=comps.text_encoder_2,
        tokenizer=comps.tokenizer,
        tokenizer_2=comps.tokenizer_2,
        transformer=comps.transformer,
        scheduler=_scheduler_copy(comps),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _scheduler_copy(comps: Any) -> Any:
    return type(comps.noise_scheduler).from_config(comps.noise_scheduler.config)
