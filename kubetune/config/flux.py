"""FLUX_LORA: LoRA on FLUX.1's transformer (and optionally its CLIP text encoder), trained with
flow matching — invoke-training's ``pipelines/flux/lora/config.py`` field for field."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kubetune.config.base import Problems
from kubetune.config.data import ImageCaptionFluxDataLoaderConfig
from kubetune.config.extensions import LoraKnobs
from kubetune.config.pipelines import (
    DEFAULT_TEXT_ENCODER_LORA_TARGETS,
    BasePipelineConfig,
    LRScheduler,
    PositiveInt,
)

# invoke-training's FLUX_TRANSFORMER_TARGET_MODULES (_shared/flux/lora_checkpoint_utils.py),
# kept as written (duplicates included, and "ff.net.2.0", which names no module of diffusers'
# FluxTransformer2DModel, so the feed-forward output layers get no LoRA there either).
DEFAULT_FLUX_LORA_TARGETS = [
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "ff.net.0.proj",
    "ff.net.2.0",
    "ff_context.net.0.proj",
    "ff_context.net.2.0",
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "proj_mlp",
    "proj_out",
    "proj_in",
]
FLUX_DEV = "black-forest-labs/FLUX.1-dev"
UNUSED_KNOBS = (
    "noise_offset",
    "input_perturbation",
    "timestep_sampling",
    "timestep_bias_multiplier",
    "timestep_bias_portion",
    "zero_terminal_snr",
)
"""Knobs of the SD types that FLUX_LORA rejects (its timesteps come from timestep_sampler)."""
# Training knobs of the SD types that have no flow-matching meaning here.
_SD_ONLY_KNOBS = {
    "noise_offset": 0.0,
    "input_perturbation": 0.0,
    "zero_terminal_snr": False,
    "compile_unet": False,
    "prediction_type": None,
    "min_snr_gamma": None,
    "vae_model": None,
}


class FluxLoraConfig(LoraKnobs, BasePipelineConfig):
    """FLUX.1 LoRA (flow matching)."""

    type: Literal["FLUX_LORA"] = "FLUX_LORA"
    model: str = FLUX_DEV
    """Base model: hub name, diffusers folder, a single FLUX.1 transformer .safetensors file
    (the text encoders and VAE then come from single_file_config, default FLUX.1-dev), or an
    s3:// prefix of a diffusers folder."""
    transformer_path: str | None = None
    """A transformer that replaces the model's, e.g. a fine-tuned FLUX.1-dev: a diffusers
    FluxTransformer2DModel folder (hub name, local or s3://) or a single .safetensors file in
    BFL layout."""
    text_encoder_1_path: str | None = None
    """A CLIPTextModel folder that replaces the model's CLIP text encoder."""
    text_encoder_2_path: str | None = None
    """A T5EncoderModel folder that replaces the model's T5 text encoder."""
    hf_variant: str | None = None  # type: ignore[assignment]
    """Weights variant to load (kubetune extension; FLUX.1 repos have none, so the default
    is None)."""
    vae_model: str | None = None
    """Not used by FLUX_LORA (kubetune extension of the SD types): must stay null."""
    xformers: bool = False
    """Accepted for symmetry with the SD types (kubetune extension for FLUX_LORA); kubetune
    always uses PyTorch SDPA attention."""
    base_embeddings: dict[str, str] = {}
    """Not used by FLUX_LORA (kubetune extension of the textual inversion types): must stay
    empty."""

    lora_checkpoint_format: Literal["invoke_peft", "kohya"] = "kohya"
    """`kohya`: one .safetensors with BFL/kohya keys (`lora_unet_double_blocks_0_img_attn_qkv`,
    `lora_te1_…`) that ComfyUI, Forge and diffusers load; `invoke_peft`: peft folders
    `transformer/` and `text_encoder_1/` (InvokeAI, peft)."""
    train_transformer: bool = True
    """Add LoRA layers to the FluxTransformer2DModel and train them."""
    train_text_encoder: bool = False
    """Add LoRA layers to the CLIP text encoder and train them (T5 is never trained)."""
    text_encoder_learning_rate: float | None = Field(default=1e-4, gt=0)
    """Learning rate of the CLIP text encoder LoRA (null: optimizer.learning_rate)."""
    transformer_learning_rate: float | None = Field(default=4e-4, gt=0)
    """Learning rate of the transformer LoRA (null: optimizer.learning_rate)."""
    lr_scheduler: LRScheduler = "constant_with_warmup"
    """Learning-rate schedule (diffusers' scheduler factory)."""
    lr_warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps at the start of the schedule."""
    min_snr_gamma: float | None = Field(default=None, gt=0)
    """Accepted as in invoke-training, where flow matching ignores it: must stay null."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Accepted as in invoke-training, where flow matching ignores it (the target is always
    noise - latents): must stay null."""
    lora_rank_dim: PositiveInt = 4
    """LoRA rank."""
    lora_alpha: float | None = Field(default=None, gt=0)
    """LoRA alpha: the update is scaled by lora_alpha / lora_rank_dim (kubetune extension;
    absent means invoke-training's fixed 1.0, i.e. scale 1/rank)."""
    flux_lora_target_modules: list[str] = DEFAULT_FLUX_LORA_TARGETS
    """Transformer module names that get LoRA layers (peft `target_modules`). The default is
    invoke-training's expressive list (attention of both block kinds, feed-forward inputs,
    single-block MLP and output, the final projection); `[to_k, to_q, to_v, to_out.0]` gives
    a smaller LoRA."""
    text_encoder_lora_target_modules: list[str] = DEFAULT_TEXT_ENCODER_LORA_TARGETS
    """CLIP text encoder module names that get LoRA layers (peft `target_modules`)."""
    cache_text_encoder_outputs: bool = False
    """Encode every caption once (CLIP pooled + T5 embeddings), keep the results with the
    run, and move both text encoders off the GPU for training (saves ~9.5 GB of T5-XXL in
    bf16). Not with train_text_encoder."""
    cache_vae_outputs: bool = False
    """Encode every image to latents once and reuse them (needs center_crop). With
    random_flip the flipped latents are cached too, as kohya does (a kubetune extension:
    invoke-training refuses the pair)."""
    enable_cpu_offload_during_validation: bool = False
    """Keep the models in CPU memory while generating validation images and move each to the
    GPU only while it runs (diffusers' model CPU offload): slower validation, less memory."""
    weight_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    """dtype of the frozen weights; trained LoRA parameters stay float32. FLUX.1 is trained in
    bfloat16: prefer bfloat16 on GPUs that have it."""
    train_batch_size: PositiveInt = 1
    """Images per step per GPU."""
    validation_prompts: list[str] = []
    """Prompts for validation images (FluxPipeline, 20 steps, guidance 3.5 as
    invoke-training)."""
    negative_validation_prompts: list[str] | None = None
    """Negative prompts, one per validation prompt (kubetune extension for FLUX_LORA: FLUX.1-dev
    is guidance-distilled, so they act only with validation_true_cfg_scale > 1)."""
    validation_true_cfg_scale: float = Field(default=1.0, ge=1.0)
    """FluxPipeline's `true_cfg_scale` for validation images (kubetune extension): above 1 the
    negative prompts run as real classifier-free guidance (twice the compute)."""
    num_validation_inference_steps: PositiveInt = 20
    """Denoising steps per validation image (kubetune extension; default invoke-training's
    fixed 20 for FLUX)."""
    use_masks: bool = False
    """Weight the flow-matching loss by a per-image mask (the JSONL `mask` column), like the SD
    types. invoke-training accepts the field but its FLUX loss ignores masks."""
    data_loader: ImageCaptionFluxDataLoaderConfig
    """Image/caption data (IMAGE_CAPTION_FLUX_DATA_LOADER)."""
    timestep_sampler: Literal["shift", "uniform"] = "shift"
    """How training timesteps are drawn: `shift` (sigmoid of a normal draw times
    sigmoid_scale, then shifted by discrete_flow_shift: favours noisier timesteps, as
    kohya's Flux trainer) or `uniform` (one of the scheduler's 1000 timesteps)."""
    discrete_flow_shift: float = Field(default=3.0, gt=0)
    """shift only: sigma' = shift·sigma / (1 + (shift - 1)·sigma)."""
    sigmoid_scale: float = Field(default=1.0, gt=0)
    """shift only: scale of the normal draw before the sigmoid (larger: more uniform)."""
    lora_scale: float | None = 1.0
    """Accepted as in invoke-training, where it has no effect on training (its prompt
    encoding applies it only with a peft-backend flag it never sets); kubetune ignores it
    too."""
    guidance_scale: float = 1.0
    """The value given to FLUX.1-dev's guidance embedding during training."""
    clip_tokenizer_max_length: int = Field(default=77, gt=0, le=77)
    """Tokens of each caption the CLIP encoder sees (at most 77)."""
    t5_tokenizer_max_length: int = Field(default=512, gt=0, le=512)
    """Tokens of each caption the T5 encoder sees (FLUX.1-dev: up to 512; schnell: 256)."""

    @model_validator(mode="after")
    def _check(self) -> FluxLoraConfig:
        p = Problems()
        self._common_problems(p)
        self._lora_knob_problems(p)
        self._flux_problems(p)
        p.raise_if_any()
        return self

    def _flux_problems(self, p: Problems) -> None:
        p.check(
            self.train_transformer or self.train_text_encoder,
            "train_transformer",
            "nothing to train: set train_transformer or train_text_encoder to true",
        )
        p.check(
            not (self.cache_text_encoder_outputs and self.train_text_encoder),
            "cache_text_encoder_outputs",
            "cached text embeddings would go stale while the text encoder trains: set "
            "train_text_encoder: false or cache_text_encoder_outputs: false",
        )
        p.check(
            not (self.cache_text_encoder_outputs and self.data_loader.caption_dropout_rate),
            "cache_text_encoder_outputs",
            "caption dropout changes captions every epoch: set caption_dropout_rate: 0 or "
            "cache_text_encoder_outputs: false",
        )
        for name, unused in _SD_ONLY_KNOBS.items():
            p.check(
                getattr(self, name) == unused,
                name,
                f"has no effect on FLUX_LORA (flow matching): remove it (or set {unused!r})",
            )
        p.check(
            not self.base_embeddings,
            "base_embeddings",
            "textual inversion embeddings are not supported with FLUX_LORA: remove it",
        )
        p.check(
            self.timestep_sampling == "uniform"
            and self.timestep_bias_multiplier is None
            and self.timestep_bias_portion is None,
            "timestep_sampling",
            "FLUX_LORA draws timesteps with timestep_sampler (shift | uniform): remove "
            "timestep_sampling / timestep_bias_*",
        )
        if self.negative_validation_prompts is not None:
            p.check(
                self.validation_true_cfg_scale > 1.0,
                "negative_validation_prompts",
                "FLUX.1 uses negative prompts only with true classifier-free guidance: set "
                "validation_true_cfg_scale above 1 (e.g. 4.0) or remove them",
            )
