"""User-facing output files: LoRA weights (kohya / A1111 or peft + diffusers layouts) and
textual-inversion embeddings (the files ``load_lora_weights`` / ``load_textual_inversion``,
A1111, ComfyUI and invoke read)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te", "text_encoder_2": "lora_te2"}
KOHYA_PREFIX_SDXL = {**KOHYA_PREFIX, "text_encoder": "lora_te1"}
LORA_FILE = "lora.safetensors"
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


@dataclass
class LoraExport:
    """The LoRA-carrying modules by role (unet, text_encoder, text_encoder_2)."""

    modules: dict[str, nn.Module]
    alpha: float
    rank: int
    is_sdxl: bool


def _peft_state(module: nn.Module) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(module)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def kohya_state_dict(lora: LoraExport) -> dict[str, torch.Tensor]:
    """kohya-ss / A1111 keys: ``lora_unet_<module_path>.lora_down.weight`` (+ ``lora_up``,
    ``alpha``); text encoders ``lora_te`` (SD) or ``lora_te1`` / ``lora_te2`` (SDXL), always
    with the ``text_model_`` path of transformers 4 CLIP models (transformers 5 dropped that
    level; A1111, ComfyUI and invoke expect it, diffusers accepts both)."""
    prefixes = KOHYA_PREFIX_SDXL if lora.is_sdxl else KOHYA_PREFIX
    out: dict[str, torch.Tensor] = {}
    for role, module in lora.modules.items():
        for key, value in _peft_state(module).items():
            path, _, kind = key.rpartition(".lora_")
            if role != "unet" and not path.startswith("text_model."):
                path = f"text_model.{path}"
            name = f"{prefixes[role]}_{path.replace('.', '_')}"
            part = {"A.weight": "lora_down.weight", "B.weight": "lora_up.weight"}[kind]
            out[f"{name}.{part}"] = value
            out[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=torch.float32)
    return out


def export_lora(lora: LoraExport, out_dir: Path, fmt: str) -> list[Path]:
    """``kohya``: one ``lora.safetensors``. ``invoke_peft``: peft folders per module
    (``unet/adapter_model.safetensors`` + ``adapter_config.json``) plus diffusers'
    ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(dir)`` reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "kohya":
        return [save_kohya(kohya_state_dict(lora), out_dir, lora.rank, lora.alpha, "networks.lora")]
    if fmt == "invoke_peft":
        return _export_peft(lora, out_dir) + [_export_diffusers(lora, out_dir)]
    raise ValueError(f"unknown lora_checkpoint_format {fmt!r}")


def save_kohya(
    state: dict[str, torch.Tensor],
    out_dir: Path,
    rank: int,
    alpha: float,
    network_module: str,
    **extra_meta: str,
) -> Path:
    """``out_dir/lora.safetensors`` with kohya's metadata (rank, alpha, network module, then
    ``extra_meta``) and ``kubetune_format: kohya``."""
    meta = {
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(alpha),
        "ss_network_module": network_module,
        **extra_meta,
        "kubetune_format": "kohya",
    }
    save_file(state, out_dir / LORA_FILE, metadata=meta)
    return out_dir / LORA_FILE


def _adapter_config(module: nn.Module) -> dict[str, object]:
    config = module.peft_config["default"].to_dict()  # type: ignore[index]
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def _export_peft(lora: LoraExport, out_dir: Path) -> list[Path]:
    written = []
    for role, module in lora.modules.items():
        folder = out_dir / role
        folder.mkdir(exist_ok=True)
        state = {f"base_model.model.{k}": v for k, v in _peft_state(module).items()}
        save_file(state, folder / "adapter_model.safetensors")
        (folder / "adapter_config.json").write_text(
            json.dumps(_adapter_config(module), indent=2, default=str) + "\n"
        )
        written += [folder / "adapter_model.safetensors", folder / "adapter_config.json"]
    return written


def _export_diffusers(lora: LoraExport, out_dir: Path) -> Path:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    kwargs: dict[str, object] = {}
    for role, module in lora.modules.items():
        layers = "unet_lora_layers" if role == "unet" else f"{role}_lora_layers"
        state = _peft_state(module)
        # diffusers reads peft keys as they are; its converted DoRA keys leave the attention
        # LoRA weights unloaded (on the meta device), so DoRA keeps peft's names.
        dora = bool(getattr(module.peft_config["default"], "use_dora", False))  # type: ignore[index]
        kwargs[layers] = state if dora else convert_state_dict_to_diffusers(state)
        kwargs[f"{role}_lora_adapter_metadata"] = _adapter_config(module)
    cls = StableDiffusionXLPipeline if lora.is_sdxl else StableDiffusionPipeline
    cls.save_lora_weights(out_dir, weight_name=DIFFUSERS_LORA_FILE, **kwargs)
    return out_dir / DIFFUSERS_LORA_FILE


def embedding_filename(placeholder: str) -> str:
    """``<my-cat>`` → ``my-cat.safetensors`` (characters unsafe in file names dropped)."""
    stem = re.sub(r"[^\w.-]+", "", placeholder).strip(".") or "embedding"
    return f"{stem}.safetensors"


def export_embeddings(out_dir: Path, placeholder: str, vectors: list[torch.Tensor]) -> Path:
    """SD: ``{placeholder: [n, 768]}`` (diffusers / A1111 read a single tensor under any key);
    SDXL (two encoders): ``{"clip_l": [n, 768], "clip_g": [n, 1280]}``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = [v.detach().float().cpu().contiguous() for v in vectors]
    state = (
        {placeholder: tensors[0]}
        if len(tensors) == 1
        else {"clip_l": tensors[0], "clip_g": tensors[1]}
    )
    path = out_dir / embedding_filename(placeholder)
    save_file(state, path, metadata={"placeholder_token": placeholder})
    return path
