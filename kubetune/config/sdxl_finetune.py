"""SDXL_FINETUNE: a full fine-tune of the SDXL UNet (invoke-training
``pipelines/stable_diffusion_xl/finetune/config.py``: its field names, defaults and meaning)."""

from __future__ import annotations

from typing import Literal

from kubetune.config.data import LoraDataLoaderConfig
from kubetune.config.pipelines import BasePipelineConfig

SaveCheckpointFormat = Literal["full_diffusers", "trained_only_diffusers"]
SaveDtype = Literal["float32", "float16", "bfloat16"]


class SdxlFinetuneConfig(BasePipelineConfig):
    """SDXL full fine-tune: every UNet weight trains (the text encoders and VAE stay frozen,
    as in invoke-training)."""

    type: Literal["SDXL_FINETUNE"] = "SDXL_FINETUNE"
    model: str = "stabilityai/stable-diffusion-xl-base-1.0"
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    data_loader: LoraDataLoaderConfig
    """Image/caption data (IMAGE_CAPTION_SD_DATA_LOADER) or DreamBooth instance/class images
    (DREAMBOOTH_SD_DATA_LOADER)."""
    save_checkpoint_format: SaveCheckpointFormat = "trained_only_diffusers"
    """What each checkpoint (and `final/`) holds. `trained_only_diffusers` (default): only the
    trained UNet, as a diffusers folder `unet/` (config.json +
    diffusion_pytorch_model.safetensors) that `UNet2DConditionModel.from_pretrained` loads
    (~5 GB in float16 for SDXL) — the choice for extracting a LoRA or swapping the UNet into
    a pipeline. `full_diffusers`: the whole pipeline in diffusers layout (UNet, both text
    encoders and tokenizers, VAE, scheduler; ~7 GB in float16) that
    `StableDiffusionXLPipeline.from_pretrained` loads: one self-contained artifact."""
    save_dtype: SaveDtype = "float16"
    """dtype of the saved model weights (float16 halves float32's size; training itself is
    unaffected: resume uses the exact trained weights kept beside them)."""
    cache_text_encoder_outputs: bool = False
    """Encode every caption once and reuse the embeddings; the text encoders then leave the
    GPU during training steps (less memory, faster steps). Both encoders are frozen in a
    full fine-tune, so it is always exact."""
