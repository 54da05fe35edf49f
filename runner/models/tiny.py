"""Tiny random-initialised SD1.5- and SDXL-shaped pipelines for tests and local demos.

Built from configs with the real diffusers / transformers classes and the real CLIP
tokenizer files shipped in ``runner/assets/clip_tokenizer``, seeded, and saved as diffusers
directories (``StableDiffusionPipeline.from_pretrained(dir)`` works offline). Each is a few
MB, builds in about a second, and trains at 64×64 on a CPU.

CLI: ``python -m runner.models.tiny OUT_DIR [--sdxl] [--seed N] [--single-file PATH]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from runner.models.single_file import save_single_file

__all__ = [
    "TOKENIZER_DIR",
    "build_tiny_sd",
    "build_tiny_sdxl",
    "save_single_file",
    "write_tokenizer",
]

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "clip_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
WIDTH = 32  # text encoder width
_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def write_tokenizer(dst: str | Path, pad_token: str = EOS) -> Path:
    """Copy the shipped CLIP tokenizer into ``dst`` (hub layout) with the given pad token.

    SD1.5's tokenizer pads with ``<|endoftext|>``; SDXL's ``tokenizer_2`` pads with ``!``.
    """
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(TOKENIZER_DIR / name, dst / name)
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    special = json.loads((TOKENIZER_DIR / "special_tokens_map.json").read_text())
    config["pad_token"] = special["pad_token"] = pad_token
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return dst


def _text_config(*, projection: bool) -> CLIPTextConfig:
    # eos_token_id is the real one (not the legacy 2) so pooled outputs stay right once
    # textual-inversion tokens with ids above 49407 are added.
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=WIDTH,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=WIDTH if projection else 512,
        hidden_act="gelu" if projection else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def tiny_vae(scaling_factor: float, latent_channels: int = 4, **extra: Any) -> AutoencoderKL:
    """Four blocks, so the latent is 8× smaller than the image like the real VAEs (``extra``:
    further ``AutoencoderKL`` arguments, e.g. FLUX's shift factor)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 32, 32),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=scaling_factor,
        **extra,
    )


def tiny_unet(cross_attention_dim: int, **extra: Any) -> UNet2DConditionModel:
    """Two blocks (32 and 64 channels, the second with cross-attention) on 4-channel latents
    (``extra``: the SD1.5 or SDXL specifics: attention heads, SDXL's time embeddings)."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        **extra,
    )


def _save_common(out: Path, unet: UNet2DConditionModel, vae: AutoencoderKL) -> None:
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    DDPMScheduler(**_SCHEDULER).save_pretrained(out / "scheduler")
    write_tokenizer(out / "tokenizer")


SD_COMPONENTS: dict[str, list[str]] = {
    "scheduler": ["diffusers", "DDPMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
"""The components SD1.5 and SDXL share (name → [library, class])."""


def write_model_index(
    out: Path, pipeline: str, components: dict[str, list[str]], **options: object
) -> None:
    """``out/model_index.json``: the pipeline class, this diffusers version, no feature
    extractor or image encoder, the ``components`` and pipeline ``options``, keys sorted."""
    index = {
        "_class_name": pipeline,
        "_diffusers_version": _diffusers_version(),
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        **options,
        **components,
    }
    text = json.dumps(index, indent=2, sort_keys=True) + "\n"
    (out / "model_index.json").write_text(text)


def build_tiny_sd(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny SD1.5-shaped diffusers directory to ``out_dir`` and return its path."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    unet = tiny_unet(WIDTH, attention_head_dim=8)
    vae = tiny_vae(0.18215)
    text_encoder = CLIPTextModel(_text_config(projection=False))
    _save_common(out, unet, vae)
    text_encoder.save_pretrained(out / "text_encoder")
    write_model_index(
        out,
        "StableDiffusionPipeline",
        SD_COMPONENTS,
        requires_safety_checker=False,
        safety_checker=[None, None],
    )
    return out


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny SDXL-shaped diffusers directory to ``out_dir`` and return its path."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    time_dim = 8
    unet = tiny_unet(
        2 * WIDTH,  # both encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + WIDTH,
    )
    vae = tiny_vae(0.13025)
    text_encoder = CLIPTextModel(_text_config(projection=False))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(projection=True))
    _save_common(out, unet, vae)
    text_encoder.save_pretrained(out / "text_encoder")
    text_encoder_2.save_pretrained(out / "text_encoder_2")
    write_tokenizer(out / "tokenizer_2", pad_token="!")
    sdxl_components = {
        **SD_COMPONENTS,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    }
    write_model_index(
        out, "StableDiffusionXLPipeline", sdxl_components, force_zeros_for_empty_prompt=True
    )
    return out


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def main(argv: list[str] | None = None) -> None:
    """``python -m runner.models.tiny OUT_DIR [--sdxl] [--seed N] [--single-file PATH]``."""
    parser = argparse.ArgumentParser(description="Write a tiny random SD1.5/SDXL model.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sdxl", action="store_true", help="SDXL-shaped (default SD1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single-file", type=Path, default=None, help="also write an SD1.5 .safetensors here"
    )
    args = parser.parse_args(argv)
    build = build_tiny_sdxl if args.sdxl else build_tiny_sd
    out = build(args.out_dir, seed=args.seed)
    print(out)
    if args.single_file is not None:
        if args.sdxl:
            parser.error("--single-file is only supported for the SD1.5 model")
        print(save_single_file(out, args.single_file))


if __name__ == "__main__":
    main()
