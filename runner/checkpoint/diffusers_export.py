"""Full models in diffusers layout (SDXL_FINETUNE's outputs), streamed tensor by tensor.

``trained_only_diffusers``: ``unet/config.json`` + ``unet/diffusion_pytorch_model.safetensors``
(what ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`` reads).
``full_diffusers``: the whole ``StableDiffusionXLPipeline`` folder (``model_index.json``,
``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``, ``tokenizer_2/``,
``scheduler/``). invoke-training casts the live modules to ``save_dtype`` and back, which
rounds the weights still training; here every weight is converted on its way to disk
(``write_safetensors``): the model is untouched and no second copy is held in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from runner.checkpoint.safetensors_stream import write_safetensors
from runner.models.assemble import inference_pipeline
from runner.models.loading import Components

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def export_module(module: nn.Module, folder: Path, dtype: torch.dtype) -> list[Path]:
    """A diffusers model (``save_config`` + diffusers weights name) or a transformers model
    (``config.save_pretrained`` + ``model.safetensors``) with its weights in ``dtype``."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):  # diffusers ModelMixin
        module.save_config(folder)
        name = DIFFUSERS_WEIGHTS
    else:  # transformers PreTrainedModel
        module.config.save_pretrained(folder)
        name = TRANSFORMERS_WEIGHTS
    write_safetensors(module.state_dict(), folder / name, dtype=dtype, metadata={"format": "pt"})
    return _files(folder)


def export_unet(unet: nn.Module, out_dir: Path, dtype: torch.dtype) -> list[Path]:
    """``out_dir/unet/`` in diffusers layout."""
    return export_module(unet, out_dir / "unet", dtype)


def export_sdxl_pipeline(comps: Components, out_dir: Path, dtype: torch.dtype) -> list[Path]:
    """The whole SDXL pipeline in diffusers layout, every model's weights in ``dtype`` (the
    training noise scheduler is saved as the pipeline's scheduler, as invoke-training does)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    models = {
        "unet": comps.unet,
        "vae": comps.vae,
        "text_encoder": comps.text_encoder,
        "text_encoder_2": comps.text_encoder_2,
    }
    for name, module in models.items():
        export_module(module, out_dir / name, dtype)
    comps.tokenizer.save_pretrained(out_dir / "tokenizer")
    comps.tokenizer_2.save_pretrained(out_dir / "tokenizer_2")  # type: ignore[union-attr]
    comps.noise_scheduler.save_pretrained(out_dir / "scheduler")
    inference_pipeline(comps).save_config(out_dir)  # model_index.json: each module's class
    return _files(out_dir)
