"""Models and the two training steps that ``train_step.py`` compares.

* ``kubetune_step``: what ``runner.session.run`` runs per optimizer step (``place_models``, the
  pipeline, ``runner.training.speed.tune_unet``, fused AdamW, ``StepRunner``), optionally with the
  VAE / text-encoder caches warmed and the encoders moved off the GPU.
* ``bare_step``: a loop written the way diffusers' ``train_text_to_image_lora.py`` /
  ``train_text_to_image_lora_sdxl.py`` write it: captions tokenized by the data loader,
  frozen weights in ``weight_dtype``, LoRA params in float32, autocast around the UNet
  (what ``accelerator.prepare(unet)`` adds), ``torch.optim.AdamW`` (foreach), gradient
  clipping at 1.0, and ``loss.item()`` every step for the progress bar.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from kubetune.config import PipelineConfig, parse_config
from runner.models.loading import Components, ModelSettings, load_model
from runner.models.tiny import TOKENIZER_DIR

SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # both loops; the diffusers default
MAX_GRAD_NORM = 1.0  # the diffusers scripts' default; kubetune set to the same
Step = Callable[[dict[str, Any]], Any]


# --- models ----------------------------------------------------------------------------------


def _clip_l() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=49407,
        bos_token_id=49406,
        projection_dim=768,
    )


def _clip_g() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=1280,
        eos_token_id=49407,
        bos_token_id=49406,
    )


def _vae(sdxl: bool) -> AutoencoderKL:
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=1024 if sdxl else 512,
        scaling_factor=0.13025 if sdxl else 0.18215,
    )


def _sdxl_unet() -> UNet2DConditionModel:
    """stabilityai/stable-diffusion-xl-base-1.0 unet/config.json."""
    return UNet2DConditionModel(
        sample_size=128,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def full_components(
    sdxl: bool, dtype: torch.dtype, device: torch.device, seed: int = 0
) -> Components:
    """Full-size SD1.5 / SDXL modules from the official configs, random weights, built
    directly on ``device`` (minutes on a CPU for SDXL, seconds on a GPU)."""
    torch.manual_seed(seed)
    comps = _build_full(sdxl, dtype, device)
    for module in (comps.unet, comps.vae, *comps.text_encoders):
        module.requires_grad_(False)  # as runner.models.loading returns them
    return comps


def _build_full(sdxl: bool, dtype: torch.dtype, device: torch.device) -> Components:
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    with device:
        vae = _vae(sdxl).to(dtype)
        text_encoder = CLIPTextModel(_clip_l()).to(dtype)
        if not sdxl:  # runwayml/stable-diffusion-v1-5: the UNet defaults + 768-wide context
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(dtype)
            return Components(
                tokenizer, text_encoder, vae, unet, DDPMScheduler(**SCHEDULER), is_sdxl=False
            )
        return Components(
            tokenizer,
            text_encoder,
            vae,
            _sdxl_unet().to(dtype),
            DDPMScheduler(**SCHEDULER),
            is_sdxl=True,
            tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77),
            text_encoder_2=CLIPTextModelWithProjection(_clip_g()).to(dtype),
        )


def tiny_components(model_dir: Path, dtype: torch.dtype, device: torch.device) -> Components:
    comps = load_model(
        ModelSettings(str(model_dir), weight_dtype=str(dtype).removeprefix("torch."))
    )
    for module in (comps.unet, comps.vae, *comps.text_encoders):
        module.to(device)
    return comps


def make_batch(batch: int, side: int, device: torch.device) -> dict[str, Any]:
    """A loader batch (pinned on CUDA, as the loader's are) plus the bare loop's token ids."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, side, side, generator=g) * 2 - 1
    captions = [f"a photo of a cat number {i}" for i in range(batch)]
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    out = {
        "pixel_values": pixels,
        "caption": captions,
        "original_size_hw": torch.tensor([[side, side]] * batch),
        "crop_top_left_yx": torch.zeros(batch, 2, dtype=torch.long),
        "id": [str(i) for i in range(batch)],
        "input_ids": ids,
    }
    if device.type == "cuda":
        out = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


# --- kubetune ----------------------------------------------------------------------------------


def bench_config(args: argparse.Namespace, sdxl: bool, *, cache: bool = False) -> PipelineConfig:
    return parse_config(
        yaml.safe_dump(
            {
                "type": "SDXL_LORA" if sdxl else "SD_LORA",
                "base_output_dir": "/tmp/bench",
                "lora_rank_dim": args.rank,
                "unet_lora_target_modules": getattr(args, "targets", None) or LORA_TARGETS,
                "train_text_encoder": False,
                "min_snr_gamma": None,
                "max_grad_norm": MAX_GRAD_NORM,
                "mixed_precision": args.mixed_precision,
                "weight_dtype": args.dtype,
                "gradient_checkpointing": args.gradient_checkpointing,
                "compile_unet": args.compile,
                "cache_vae_outputs": cache,
                "cache_text_encoder_outputs": cache,
                "max_train_steps": 1,
                "save_every_n_steps": 1,
                "data_loader": {
                    "type": "IMAGE_CAPTION_SD_DATA_LOADER",
                    "resolution": args.side,
                    "center_crop": True,
                    "random_flip": False,
                    "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "/tmp"},
                },
            }
        )
    )


def kubetune_step(
    comps: Components,
    args: argparse.Namespace,
    device: torch.device,
    *,
    cache_batch: dict[str, Any] | None = None,
) -> Step:
    """kubetune's model placement, pipeline, optimizer and ``StepRunner``; with
    ``cache_batch`` its latents / embeddings are cached and the encoders offloaded."""
    from runner.session.build import build_training
    from runner.session.load import make_accelerator, place_models
    from runner.training.loop import StepRunner

    cfg = bench_config(args, comps.is_sdxl, cache=cache_batch is not None)
    accelerator = make_accelerator(cfg.mixed_precision)
    place_models(comps, cfg.weight_dtype, device)
    torch.manual_seed(0)
    pipeline, optimizer, scheduler = build_training(cfg, comps, accelerator, 10**6)
    if not args.channels_last:  # A/B switch: undo what build_training chose on CUDA
        comps.unet.to(memory_format=torch.contiguous_format)
    if cache_batch is not None:
        pipeline.warm_caches([cache_batch])
    runner = StepRunner(
        accelerator,
        pipeline,
        optimizer,
        scheduler,
        torch.Generator(device).manual_seed(0),
        cfg.max_grad_norm,
    )
    return lambda batch: runner.run([batch], 0)


# --- the diffusers-example loop ----------------------------------------------------------------


def bare_step(comps: Components, args: argparse.Namespace, device: torch.device) -> Step:
    """One step of diffusers' ``train_text_to_image_lora(_sdxl).py`` (see module doc)."""
    unet, vae, scheduler = comps.unet, comps.vae, comps.noise_scheduler
    for module in (unet, vae, *comps.text_encoders):
        module.requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(
        LoraConfig(
            r=args.rank,
            lora_alpha=args.rank,
            init_lora_weights="gaussian",
            target_modules=LORA_TARGETS,
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # cast_training_params(unet, dtype=torch.float32)
        p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.compile:
        unet.compile()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    autocast = (
        torch.autocast(device.type, torch.bfloat16)
        if args.mixed_precision == "bf16"
        else contextlib.nullcontext()
    )

    def text(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any] | None]:
        ids = batch["input_ids"].to(device)
        if not comps.is_sdxl:
            return comps.text_encoder(ids, return_dict=False)[0], None
        o1 = comps.text_encoder(ids, output_hidden_states=True)
        o2 = comps.text_encoder_2(ids, output_hidden_states=True)  # same tokenizer files
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
        time_ids = torch.cat(
            [
                torch.tensor([list(hw) + list(yx) + [args.side, args.side]]).to(device, unet.dtype)
                for hw, yx in zip(
                    batch["original_size_hw"].tolist(),
                    batch["crop_top_left_yx"].tolist(),
                    strict=True,
                )
            ]
        )
        return hidden, {"text_embeds": o2.text_embeds, "time_ids": time_ids}

    def step(batch: dict[str, Any]) -> float:
        pixels = batch["pixel_values"].to(device).to(vae.dtype)
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = scheduler.add_noise(latents, noise, t)
        hidden, added = text(batch)
        with autocast:
            pred = unet(noisy, t, hidden, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        train_loss = loss.detach().item()  # the scripts' per-step logging sync
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad()
        return train_loss

    return step
