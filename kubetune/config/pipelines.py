"""The training pipeline types, keyed on `type` (invoke-training field names)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kubetune.config.base import ConfigModel, Problems, exactly_one
from kubetune.config.cluster import JobConfig, StorageConfig
from kubetune.config.data import LoraDataLoaderConfig, TextualInversionSDDataLoaderConfig
from kubetune.config.extensions import LoraKnobs, TrainingKnobs
from kubetune.config.notify import NotifyConfig

PositiveInt = Annotated[int, Field(gt=0)]
LRScheduler = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
# invoke-training's defaults (_shared/stable_diffusion/lora_checkpoint_utils.py), themselves
# taken from peft's DreamBooth example: every attention, feed-forward and resnet layer.
DEFAULT_UNET_LORA_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "proj",
    "proj_in",
    "proj_out",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "to_out.0",
    "time_emb_proj",
    "ff.net.2",
]
DEFAULT_TEXT_ENCODER_LORA_TARGETS = ["fc1", "fc2", "q_proj", "k_proj", "v_proj", "out_proj"]
INVOKE_LORA_ALPHA = 1.0
"""invoke-training builds every LoRA with ``lora_alpha=1.0`` (update scale 1/rank)."""


class AdamOptimizerConfig(ConfigModel):
    """AdamW (torch; fused on CUDA)."""

    optimizer_type: Literal["AdamW"] = "AdamW"
    learning_rate: float = Field(default=1e-4, gt=0)
    """Base learning rate (per-module rates below override it)."""
    beta1: float = Field(default=0.9, ge=0, lt=1)
    """Adam's first-moment decay."""
    beta2: float = Field(default=0.999, ge=0, lt=1)
    """Adam's second-moment decay."""
    weight_decay: float = Field(default=1e-2, ge=0)
    """Decoupled weight decay."""
    epsilon: float = Field(default=1e-8, gt=0)
    """Numerical-stability term of the denominator."""
    use_8bit: bool = False
    """8-bit AdamW from bitsandbytes (`pip install 'kubetune[adam8bit]'`): on a CUDA GPU, or on
    the CPU from bitsandbytes 0.50."""


class ProdigyOptimizerConfig(ConfigModel):
    """Prodigy (prodigyopt): adapts its own step size; keep learning_rate at 1.0."""

    optimizer_type: Literal["Prodigy"] = "Prodigy"
    learning_rate: float = Field(default=1.0, gt=0)
    """Multiplier of Prodigy's adapted step size (1.0 is the recommended value)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """Decoupled weight decay."""
    use_bias_correction: bool = False
    """Adam-style bias correction of the step-size estimate."""
    safeguard_warmup: bool = False
    """Avoid a too-large step size during learning-rate warm-up."""


OptimizerConfig = Annotated[
    AdamOptimizerConfig | ProdigyOptimizerConfig, Field(discriminator="optimizer_type")
]


class BasePipelineConfig(TrainingKnobs):
    """Fields every pipeline type shares."""

    seed: int | None = None
    """Random seed; a fixed seed makes a CPU run reproducible bit-for-bit."""
    base_output_dir: str | None = None
    """Where a local run writes its outputs; a relative path is relative to the config file's
    folder. Required without `storage:`; with `storage:` the outputs go to the bucket and this
    field may be left out (kubetune extension: invoke-training always requires it), the run
    then being named by `job.name`."""
    report_to: Literal["all", "tensorboard", "wandb", "comet_ml"] | None = "tensorboard"
    """Experiment tracker; kubetune writes TensorBoard event files under `logs/`."""
    max_train_steps: PositiveInt | None = None
    """Train for this many optimizer steps (set this or max_train_epochs)."""
    max_train_epochs: PositiveInt | None = None
    """Train for this many epochs (set this or max_train_steps)."""
    save_every_n_steps: PositiveInt | None = None
    """Checkpoint every N steps (set this or save_every_n_epochs)."""
    save_every_n_epochs: PositiveInt | None = None
    """Checkpoint every N epochs (set this or save_every_n_steps)."""
    validate_every_n_steps: PositiveInt | None = None
    """Generate validation images every N steps (or use validate_every_n_epochs)."""
    validate_every_n_epochs: PositiveInt | None = None
    """Generate validation images every N epochs (or use validate_every_n_steps)."""
    max_checkpoints: PositiveInt | None = None
    """Keep at most this many checkpoints (oldest pruned first; the newest is never pruned)."""

    model: str = "runwayml/stable-diffusion-v1-5"
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    hf_variant: str | None = "fp16"
    """Weights variant to load (e.g. fp16); falls back to the default weights if absent."""
    single_file_config: str | None = None
    """For a single-file `model`: a local diffusers directory (or hub name) with the model's
    configs, so loading works offline (kubetune extension)."""
    vae_model: str | None = None
    """Replacement VAE (hub name, local dir or s3:// prefix); a kubetune extension for the SD
    1.x types (invoke-training has it for SDXL only)."""
    base_embeddings: dict[str, str] = {}
    """Textual inversion embeddings to load before training: {token: path}; a multi-vector
    token in a caption is expanded to all its vectors. A kubetune extension for the
    textual inversion types (invoke-training has it for SD_LORA / SDXL_LORA)."""
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """Override the scheduler's prediction type (None keeps the model's)."""

    optimizer: OptimizerConfig = Field(default_factory=AdamOptimizerConfig)
    """Optimizer settings."""
    lr_scheduler: LRScheduler = "constant"
    """Learning-rate schedule (diffusers' scheduler factory)."""
    lr_warmup_steps: int = Field(default=0, ge=0)
    """Linear warm-up steps at the start of the schedule."""
    min_snr_gamma: float | None = Field(default=5.0, gt=0)
    """Min-SNR loss weighting gamma (None disables it)."""
    max_grad_norm: float | None = Field(default=None, gt=0)
    """Clip gradients to this norm (None: no clipping)."""
    train_batch_size: PositiveInt = 4
    """Images per step per GPU."""
    gradient_accumulation_steps: PositiveInt = 1
    """Micro-batches accumulated into one optimizer step."""
    weight_dtype: Literal["float32", "float16", "bfloat16"] = "bfloat16"
    """dtype of the frozen weights; trained parameters stay float32."""
    mixed_precision: Literal["no", "fp16", "bf16", "fp8"] = "no"
    """Autocast precision for the forward pass. `fp8` is accepted by the schema (as in
    invoke-training) but rejected by validation: kubetune has no fp8 training path."""
    xformers: bool = False
    """Accepted for compatibility; kubetune always uses PyTorch SDPA attention."""
    gradient_checkpointing: bool = False
    """Trade compute for memory in the UNet / text encoders."""
    compile_unet: bool = False
    """torch.compile the UNet for the training steps (kubetune extension; CUDA; slower first
    steps, faster afterwards): each aspect bucket compiles once, validation runs eager. Needs
    a C compiler and the Python headers (the kubetune image has them)."""
    cache_vae_outputs: bool = False
    """Encode every image to latents once and reuse them (needs center_crop). With
    random_flip the flipped latents are cached too, as kohya does (a kubetune extension:
    invoke-training refuses the pair)."""
    encoder_cache_device_mb: float = Field(default=2048, ge=0)
    """kubetune extension: GPU memory (MiB) the cached latents and text embeddings may
    take; entries beyond it wait in pinned host memory and are copied in with their batch
    (0: all in host memory)."""
    enable_cpu_offload_during_validation: bool = False
    """Offload the validation pipeline to CPU to save GPU memory."""
    validation_prompts: list[str] = []
    """Prompts for validation images."""
    negative_validation_prompts: list[str] | None = None
    """Negative prompts, one per validation prompt."""
    num_validation_images_per_prompt: PositiveInt = 4
    """Images per validation prompt."""
    num_validation_inference_steps: PositiveInt = 30
    """Denoising steps per validation image (kubetune extension; default invoke-training's
    fixed 30)."""
    log_every_n_steps: PositiveInt = 10
    """Write a progress line (step, loss, lr, images/s, ETA) every N steps (kubetune extension)."""
    lease_timeout_seconds: float = Field(120.0, gt=0)
    """kubetune extension: a run's single-writer lease not renewed for this long is stale and
    the next runner takes it over (a killed pod); renewed every quarter of it."""
    lease_wait_seconds: float = Field(180.0, ge=0)
    """kubetune extension: how long a second runner waits for a live lease to be released or
    to go stale before it exits 2 naming the holder (longer than lease_timeout_seconds lets a
    replacement pod outwait its killed predecessor)."""
    use_masks: bool = False
    """Weight the loss by a per-image mask: each line of an IMAGE_CAPTION_JSONL_DATASET names
    a `mask` image (path absolute, relative to the .jsonl, or s3://; read as greyscale, 0 =
    ignore, 255 = full weight), cropped and flipped with its image."""

    job: JobConfig | None = None
    """How the Kubernetes Job runs (kubetune extension)."""
    storage: StorageConfig | None = None
    """S3-compatible storage for datasets and outputs (kubetune extension)."""
    notify: NotifyConfig | None = None
    """Webhooks told when the run starts, checkpoints, validates and ends
    (kubetune extension)."""

    @model_validator(mode="after")
    def _check(self) -> BasePipelineConfig:
        """Every cross-field rule of the type at once (``_problems``), one line each."""
        p = Problems()
        self._problems(p)
        p.raise_if_any()
        return self

    def _problems(self, p: Problems) -> None:
        """The type's cross-field rules; each type adds its own to the common ones."""
        self._common_problems(p)

    def _common_problems(self, p: Problems) -> None:
        self._knob_problems(p)
        if self.base_output_dir is None:
            p.check(
                self.storage is not None,  # type: ignore[attr-defined]
                "base_output_dir",
                "missing; set the folder this run writes to (or add a `storage:` section, "
                "which puts the outputs in a bucket)",
            )
            p.check(
                self.storage is None or bool(self.job and self.job.name),  # type: ignore[attr-defined]
                "job.name",
                "missing; name the run (without base_output_dir the run name comes from job.name)",
            )
        storage, job = self.storage, self.job  # type: ignore[attr-defined]
        p.check(
            storage is None or not storage.workload_identity or job is None
            or bool(job.service_account),
            "job.service_account",
            "missing; storage.workload_identity takes the credentials from the pod's "
            "ServiceAccount: name it (annotated for IRSA / GKE / Azure Workload Identity)",
        )  # fmt: skip
        exactly_one(
            p,
            {"max_train_steps": self.max_train_steps, "max_train_epochs": self.max_train_epochs},
            "training length",
        )
        exactly_one(
            p,
            {
                "save_every_n_steps": self.save_every_n_steps,
                "save_every_n_epochs": self.save_every_n_epochs,
            },
            "checkpoint cadence",
        )
        if self.validation_prompts:
            exactly_one(
                p,
                {
                    "validate_every_n_steps": self.validate_every_n_steps,
                    "validate_every_n_epochs": self.validate_every_n_epochs,
                },
                "validation cadence",
            )
        elif self.validate_every_n_steps and self.validate_every_n_epochs:
            p.add(
                "validate_every_n_epochs",
                "set only one of validate_every_n_steps / validate_every_n_epochs",
            )
        negatives = self.negative_validation_prompts
        if negatives is not None and len(negatives) != len(self.validation_prompts):
            p.add(
                "negative_validation_prompts",
                f"needs one entry per validation prompt ({len(self.validation_prompts)}), "
                f"got {len(negatives)}",
            )
        if self.use_masks:
            p.check(
                getattr(self.data_loader, "dataset", None) is not None  # type: ignore[attr-defined]
                and self.data_loader.dataset.type == "IMAGE_CAPTION_JSONL_DATASET",  # type: ignore[attr-defined]
                "use_masks",
                "masks come from the `mask` column of an IMAGE_CAPTION_JSONL_DATASET (not "
                "DreamBooth folders): use that dataset type or set use_masks: false",
            )
        p.check(
            self.mixed_precision != "fp8",
            "mixed_precision",
            "fp8 is not supported: kubetune trains with torch autocast, which has no fp8 "
            "mode, and fp8 training needs an fp8 GPU (H100+) plus TransformerEngine/torchao; "
            "use bf16 (or fp16)",
        )
        p.check(
            not (self.mixed_precision == "fp16" and self.weight_dtype == "bfloat16"),
            "mixed_precision",
            "fp16 autocast with bfloat16 weights mixes formats: use "
            "mixed_precision: bf16 or weight_dtype: float16",
        )
        loader = self.data_loader  # type: ignore[attr-defined]
        # with random_flip both orientations are cached; a random crop cannot be
        if self.cache_vae_outputs and not loader.center_crop:
            p.add(
                "cache_vae_outputs",
                "cached latents would freeze one random crop: set "
                "data_loader.center_crop: true or cache_vae_outputs: false",
            )


class _LoraFields(LoraKnobs):
    lora_rank_dim: PositiveInt = 4
    """LoRA rank."""
    lora_alpha: float | None = Field(default=None, gt=0)
    """LoRA alpha: the update is scaled by lora_alpha / lora_rank_dim (kubetune extension;
    absent means invoke-training's fixed 1.0, i.e. scale 1/rank)."""
    unet_lora_target_modules: list[str] = DEFAULT_UNET_LORA_TARGETS
    """UNet module names that get LoRA layers (peft `target_modules`). The default is
    invoke-training's expressive list (attention, feed-forward, resnet convs, time
    embedding); `[to_q, to_k, to_v, to_out.0]` gives a lighter LoRA. For
    SDXL_LORA_AND_TEXTUAL_INVERSION this field is a kubetune extension (invoke-training
    always uses the default there)."""
    text_encoder_lora_target_modules: list[str] = DEFAULT_TEXT_ENCODER_LORA_TARGETS
    """Text encoder module names that get LoRA layers (peft `target_modules`); default
    invoke-training's `[fc1, fc2, q_proj, k_proj, v_proj, out_proj]`. For
    SDXL_LORA_AND_TEXTUAL_INVERSION this field is a kubetune extension (invoke-training
    always uses the default there)."""
    lora_checkpoint_format: Literal["kohya", "invoke_peft"] = "kohya"
    """`kohya`: one .safetensors with kohya/A1111 keys; `invoke_peft`: peft/diffusers folders."""
    train_unet: bool = True
    """Train LoRA layers on the UNet."""
    train_text_encoder: bool = True
    """Train LoRA layers on the text encoder(s)."""
    unet_learning_rate: float | None = Field(default=None, gt=0)
    """UNet learning rate (default: optimizer.learning_rate)."""
    text_encoder_learning_rate: float | None = Field(default=None, gt=0)
    """Text encoder learning rate (default: optimizer.learning_rate)."""
    cache_text_encoder_outputs: bool = False
    """Encode every caption once and reuse it (not with train_text_encoder)."""

    def _lora_problems(self, p: Problems, trains_ti: bool = False) -> None:
        self._lora_knob_problems(p)
        p.check(
            self.train_unet or self.train_text_encoder or trains_ti,
            "train_unet",
            "nothing to train: set train_unet or train_text_encoder to true",
        )
        if self.cache_text_encoder_outputs and (self.train_text_encoder or trains_ti):
            p.add(
                "cache_text_encoder_outputs",
                "cached text embeddings would go stale while "
                "the text encoder trains: set train_text_encoder: false or "
                "cache_text_encoder_outputs: false",
            )
        if self.cache_text_encoder_outputs and getattr(
            self.data_loader, "shuffle_caption_delimiter", None
        ):  # type: ignore[attr-defined]
            p.add(
                "cache_text_encoder_outputs",
                "cannot cache embeddings of captions that are shuffled every step",
            )


class _SdxlTextEncoderRates(ConfigModel):
    text_encoder_1_learning_rate: float | None = Field(default=None, gt=0)
    """SDXL: learning rate of text encoder 1 (CLIP-L) (kubetune extension; absent:
    text_encoder_learning_rate, as invoke-training)."""
    text_encoder_2_learning_rate: float | None = Field(default=None, gt=0)
    """SDXL: learning rate of text encoder 2 (OpenCLIP-G) (kubetune extension; absent:
    text_encoder_learning_rate, as invoke-training)."""


class _TextualInversionFields(ConfigModel):
    num_vectors: PositiveInt = 1
    """Embedding vectors for the new concept (tokens placeholder, placeholder_1, ...).
    Ignored with initial_phrase, which sets it to the phrase's token count (as
    invoke-training)."""
    placeholder_token: str
    """The new token, e.g. `<my-cat>`; a single word without spaces."""
    initializer_token: str | None = None
    """An existing word whose embedding initialises every new vector (e.g. `cat`); if it is
    several tokens, the first is used and a warning logged (as invoke-training)."""
    initial_phrase: str | None = None
    """A phrase whose token embeddings initialise the new vectors, one vector per token
    (this sets num_vectors)."""
    initial_embedding_file: str | None = None
    """A TI .safetensors file to start from (a kubetune extension for
    SDXL_LORA_AND_TEXTUAL_INVERSION)."""

    def _ti_problems(self, p: Problems) -> None:
        token = self.placeholder_token
        p.check(
            bool(token.strip()) and not any(c.isspace() for c in token),
            "placeholder_token",
            f"{token!r} must be one word without spaces, e.g. <my-concept>",
        )
        exactly_one(
            p,
            {
                "initializer_token": self.initializer_token,
                "initial_phrase": self.initial_phrase,
                "initial_embedding_file": self.initial_embedding_file,
            },
            "how the new embedding starts",
        )
        for name in ("initializer_token", "initial_phrase"):
            value = getattr(self, name)
            p.check(
                value is None or bool(value.strip()),
                name,
                "must not be empty (e.g. 'cat')",
            )


_SD_MODEL = "runwayml/stable-diffusion-v1-5"
_SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"


class SdLoraConfig(_LoraFields, BasePipelineConfig):
    """SD 1.x/2.x LoRA."""

    type: Literal["SD_LORA"] = "SD_LORA"
    model: str = _SD_MODEL
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    data_loader: LoraDataLoaderConfig
    """Image/caption data (IMAGE_CAPTION_SD_DATA_LOADER) or DreamBooth instance/class images
    (DREAMBOOTH_SD_DATA_LOADER)."""

    def _problems(self, p: Problems) -> None:
        self._common_problems(p)
        self._lora_problems(p)


class SdxlLoraConfig(_SdxlTextEncoderRates, _LoraFields, BasePipelineConfig):
    """SDXL LoRA."""

    type: Literal["SDXL_LORA"] = "SDXL_LORA"
    model: str = _SDXL_MODEL
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    data_loader: LoraDataLoaderConfig
    """Image/caption data (IMAGE_CAPTION_SD_DATA_LOADER) or DreamBooth instance/class images
    (DREAMBOOTH_SD_DATA_LOADER)."""

    def _problems(self, p: Problems) -> None:
        self._common_problems(p)
        self._lora_problems(p)


class SdTextualInversionConfig(_TextualInversionFields, BasePipelineConfig):
    """SD 1.x/2.x Textual Inversion."""

    type: Literal["SD_TEXTUAL_INVERSION"] = "SD_TEXTUAL_INVERSION"
    model: str = _SD_MODEL
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    data_loader: TextualInversionSDDataLoaderConfig
    """Template-captioned data."""

    def _problems(self, p: Problems) -> None:
        self._common_problems(p)
        self._ti_problems(p)


class SdxlTextualInversionConfig(_TextualInversionFields, BasePipelineConfig):
    """SDXL Textual Inversion (trains both text encoders' embeddings)."""

    type: Literal["SDXL_TEXTUAL_INVERSION"] = "SDXL_TEXTUAL_INVERSION"
    model: str = _SDXL_MODEL
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    data_loader: TextualInversionSDDataLoaderConfig
    """Template-captioned data."""

    def _problems(self, p: Problems) -> None:
        self._common_problems(p)
        self._ti_problems(p)


class SdxlLoraAndTextualInversionConfig(
    _SdxlTextEncoderRates, _TextualInversionFields, _LoraFields, BasePipelineConfig
):
    """SDXL LoRA and Textual Inversion together (pivotal tuning)."""

    type: Literal["SDXL_LORA_AND_TEXTUAL_INVERSION"] = "SDXL_LORA_AND_TEXTUAL_INVERSION"
    model: str = _SDXL_MODEL
    """Base model: hub name, diffusers dir, single .safetensors/.ckpt file, or s3:// prefix."""
    data_loader: TextualInversionSDDataLoaderConfig
    """Template-captioned data."""
    train_ti: bool = True
    """Train the new token embeddings."""
    ti_train_steps_ratio: float | None = Field(default=None, gt=0, le=1)
    """Train the embeddings only for this fraction of the steps (None: all steps)."""
    textual_inversion_learning_rate: float = Field(default=1e-3, gt=0)
    """Learning rate of the new token embeddings."""
    unet_learning_rate: float = Field(default=1e-4, gt=0)  # type: ignore[assignment]
    """UNet LoRA learning rate (invoke-training's default for this type: 1e-4)."""
    text_encoder_learning_rate: float = Field(default=1e-5, gt=0)  # type: ignore[assignment]
    """Text encoder LoRA learning rate (invoke-training's default for this type: 1e-5)."""

    def _problems(self, p: Problems) -> None:
        self._common_problems(p)
        self._ti_problems(p)
        self._lora_problems(p, trains_ti=self.train_ti)
