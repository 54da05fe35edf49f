"""FLUX_LORA's user-facing files.

``kohya``: one ``lora.safetensors`` in the layout ComfyUI, Forge and kohya sd-scripts use for
FLUX.1: transformer modules under their BFL names (``lora_unet_double_blocks_0_img_attn_qkv``,
fused q/k/v with a stacked down and block-diagonal up matrix, see
``runner.models.flux_keys``), the CLIP text encoder as ``lora_te1_text_model_…``;
``lora_down`` / ``lora_up`` / ``alpha`` per module. diffusers' ``load_lora_weights`` reads
it too. ``invoke_peft``: peft folders ``transformer/`` and ``text_encoder_1/`` (what
invoke-training writes; InvokeAI and ``PeftModel.from_pretrained`` read them) plus diffusers'
``pytorch_lora_weights.safetensors`` that ``FluxPipeline.load_lora_weights(dir)`` reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from runner.checkpoint.exporters import (
    DIFFUSERS_LORA_FILE,
    LoraExport,
    _adapter_config,
    _export_peft,
    _peft_state,
    kohya_state_dict,
    save_kohya,
)
from runner.models.flux_keys import kohya_transformer_lora


@dataclass
class FluxLoraExport:
    """The LoRA-carrying modules by role: ``transformer``, ``text_encoder_1`` (CLIP)."""

    modules: dict[str, nn.Module]
    alpha: float
    rank: int


def flux_kohya_state_dict(lora: FluxLoraExport) -> dict[str, torch.Tensor]:
    """``lora_unet_<BFL module>`` for the transformer, ``lora_te1_…`` for CLIP."""
    out: dict[str, torch.Tensor] = {}
    transformer = lora.modules.get("transformer")
    if transformer is not None:
        sizes = {
            name: m.out_features
            for name, m in transformer.named_modules()
            if isinstance(getattr(m, "out_features", None), int)
        }
        out.update(kohya_transformer_lora(_peft_state(transformer), sizes, lora.alpha))
    clip = lora.modules.get("text_encoder_1")
    if clip is not None:
        clip_only = LoraExport({"text_encoder": clip}, lora.alpha, lora.rank, is_sdxl=True)
        out.update(kohya_state_dict(clip_only))  # SDXL's prefix for CLIP-L: lora_te1
    return out


def export_flux_lora(lora: FluxLoraExport, out_dir: Path, fmt: str) -> list[Path]:
    """Write ``fmt`` (``kohya`` | ``invoke_peft``) into ``out_dir``; return the files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        state, meta = flux_kohya_state_dict(lora), {"ss_base_model_version": "flux1"}
        return [save_kohya(state, out_dir, lora.rank, lora.alpha, "networks.lora_flux", **meta)]
    if fmt == "invoke_peft":
        peft = LoraExport(lora.modules, lora.alpha, lora.rank, is_sdxl=False)
        return _export_peft(peft, out_dir) + [_export_diffusers(lora, out_dir)]
    raise ValueError(f"unknown lora_checkpoint_format {fmt!r}")


def _export_diffusers(lora: FluxLoraExport, out_dir: Path) -> Path:
    from diffusers import FluxPipeline

    kwargs: dict[str, object] = {}
    for role, layers in (("transformer", "transformer"), ("text_encoder_1", "text_encoder")):
        module = lora.modules.get(role)
        if module is not None:
            kwargs[f"{layers}_lora_layers"] = _peft_state(module)
            kwargs[f"{layers}_lora_adapter_metadata"] = _adapter_config(module)
    FluxPipeline.save_lora_weights(out_dir, weight_name=DIFFUSERS_LORA_FILE, **kwargs)
    return out_dir / DIFFUSERS_LORA_FILE
