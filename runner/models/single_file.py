"""Write a diffusers SD1.5 directory as one original-layout (``ldm``) ``.safetensors`` file.

Used to make single-file test checkpoints from the tiny models: the file has the key names
of the original Stable Diffusion / A1111 checkpoints (``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``), so diffusers'
``from_single_file`` reads it back. Offline that needs ``config=<a diffusers directory>``
(the component configs cannot be inferred from a tiny model's shapes, and the default is
fetched from the hub). The UNet / VAE key maps generalise diffusers'
``scripts/convert_diffusers_to_original_stable_diffusion.py`` to any number of blocks and
``layers_per_block``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_VAE_ATTN = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def _unet_prefix_map(config: dict) -> list[tuple[str, str]]:
    """(ldm prefix, diffusers prefix) pairs for a UNet2DConditionModel config."""
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    up_has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    pairs = list(_UNET_TOP)
    for i in range(n):
        for j in range(per):
            pairs.append(
                (f"input_blocks.{(per + 1) * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}.")
            )
            pairs.append(
                (f"input_blocks.{(per + 1) * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}.")
            )
        for j in range(per + 1):
            pairs.append((f"output_blocks.{(per + 1) * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            pairs.append(
                (f"output_blocks.{(per + 1) * i + j}.1.", f"up_blocks.{i}.attentions.{j}.")
            )
        if i < n - 1:
            pairs.append(
                (
                    f"input_blocks.{(per + 1) * (i + 1)}.0.op.",
                    f"down_blocks.{i}.downsamplers.0.conv.",
                )
            )
            slot = 2 if up_has_attn[i] else 1
            pairs.append(
                (f"output_blocks.{(per + 1) * i + per}.{slot}.", f"up_blocks.{i}.upsamplers.0.")
            )
    pairs.append(("middle_block.1.", "mid_block.attentions.0."))
    for j in range(2):
        pairs.append((f"middle_block.{2 * j}.", f"mid_block.resnets.{j}."))
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for ldm, hf in pairs:
        if key.startswith(hf):
            return ldm + key[len(hf) :]
    raise KeyError(key)


def convert_unet(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers UNet2DConditionModel state dict → ``model.diffusion_model.*`` keys."""
    pairs = _unet_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = _rename(key, pairs)
        if ".0." in new and any(new.split(".", 2)[-1].startswith(hf) for _, hf in _RESNET):
            for ldm, hf in _RESNET:
                new = new.replace(f".{hf}.", f".{ldm}.")
        out["model.diffusion_model." + new] = value
    return out


def _vae_prefix_map(config: dict) -> list[tuple[str, str]]:
    n, per = len(config["block_out_channels"]), config["layers_per_block"]
    pairs = [
        ("encoder.mid.attn_1.", "encoder.mid_block.attentions.0."),
        ("decoder.mid.attn_1.", "decoder.mid_block.attentions.0."),
    ]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.norm_out.", f"{part}.conv_norm_out.")]
        for j in range(2):
            pairs.append((f"{part}.mid.block_{j + 1}.", f"{part}.mid_block.resnets.{j}."))
    for i in range(n):
        for j in range(per):
            pairs.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(per + 1):
            pairs.append(
                (f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            )
        if i < n - 1:
            pairs.append(
                (f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0.")
            )
            pairs.append(
                (f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0.")
            )
    return pairs


def convert_vae(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Diffusers AutoencoderKL state dict → ``first_stage_model.*`` keys (1×1 conv attention)."""
    pairs = _vae_prefix_map(config)
    out = {}
    for key, value in state.items():
        new = key
        if not key.startswith(
            ("quant_conv", "post_quant_conv", "encoder.conv_", "decoder.conv_")
        ) or key.startswith(("encoder.conv_norm_out", "decoder.conv_norm_out")):
            new = _rename(key, pairs)
        new = new.replace("conv_shortcut", "nin_shortcut")
        if ".mid.attn_1." in new:
            for ldm, hf in _VAE_ATTN:
                new = new.replace(f".attn_1.{hf}", f".attn_1.{ldm}")
            if value.ndim == 2:
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def save_single_file(model_dir: str | Path, out_path: str | Path) -> Path:
    """Write the SD1.5 diffusers directory ``model_dir`` as one ldm-layout checkpoint file
    (``.safetensors``, or a pickled ``.ckpt`` for any other suffix).

    Load it back offline with ``StableDiffusionPipeline.from_single_file(out_path,
    config=model_dir)`` (or ``runner.models.loading.load_model(ModelSettings(out_path,
    single_file_config=model_dir))``).
    """
    model_dir, out_path = Path(model_dir), Path(out_path)

    def part(name: str, weights: str) -> tuple[dict[str, torch.Tensor], dict]:
        config = json.loads((model_dir / name / "config.json").read_text())
        return load_file(model_dir / name / weights), config

    unet, unet_cfg = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_cfg = part("vae", "diffusion_pytorch_model.safetensors")
    text, _ = part("text_encoder", "model.safetensors")
    state = convert_unet(unet, unet_cfg) | convert_vae(vae, vae_cfg)
    # transformers >= 5.6 saves CLIPTextModel without the ``text_model.`` level ldm files have
    prefix = "cond_stage_model.transformer."
    state |= {
        prefix + ("" if k.startswith("text_model.") else "text_model.") + k: v
        for k, v in text.items()
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if out_path.suffix == ".safetensors":
        save_file(state, out_path)
    else:  # .ckpt: the original pickle layout, weights under "state_dict"
        torch.save({"state_dict": state}, out_path)
    return out_path
