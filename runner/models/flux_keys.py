"""FLUX.1 transformer weights between diffusers' names and Black Forest Labs' (BFL) names, the
layout of the original ``flux1-dev.safetensors`` that ComfyUI, Forge and kohya use.

BFL fuses what diffusers keeps apart: a double block's ``img_attn.qkv`` is diffusers'
``attn.to_q``, ``to_k``, ``to_v`` stacked on the output dimension, a single block's
``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp``. ``final_layer.adaLN_modulation.1``
is ``norm_out.linear`` with its (shift, scale) halves in the other order. The mapping is the
inverse of diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` (checked against
it in ``tests/test_runner/test_flux_keys.py``), with the split sizes read from the tensors
instead of FLUX.1's fixed 3072 / 12288, so it works for any size.

Used to read a single-file FLUX.1 transformer, to write one (tests, tiny model) and to write
kohya-format LoRAs (``lora_unet_<BFL module with _>.lora_down.weight`` …): fused modules get
one LoRA whose down matrix stacks the parts' A matrices and whose up matrix is block-diagonal,
with alpha multiplied by the number of parts so alpha / rank is unchanged (kohya sd-scripts'
``split_qkv`` export).
"""

from __future__ import annotations

from pathlib import Path

import torch

SWAPPED = "final_layer.adaLN_modulation.1"
"""The BFL module whose output halves are in the other order than diffusers' norm_out."""


def _top_level() -> list[tuple[str, list[str]]]:
    embed = "time_text_embed"
    return [
        ("img_in", ["x_embedder"]),
        ("txt_in", ["context_embedder"]),
        ("time_in.in_layer", [f"{embed}.timestep_embedder.linear_1"]),
        ("time_in.out_layer", [f"{embed}.timestep_embedder.linear_2"]),
        ("vector_in.in_layer", [f"{embed}.text_embedder.linear_1"]),
        ("vector_in.out_layer", [f"{embed}.text_embedder.linear_2"]),
        ("guidance_in.in_layer", [f"{embed}.guidance_embedder.linear_1"]),
        ("guidance_in.out_layer", [f"{embed}.guidance_embedder.linear_2"]),
        ("final_layer.linear", ["proj_out"]),
        (SWAPPED, ["norm_out.linear"]),
    ]


def _double(i: int) -> list[tuple[str, list[str]]]:
    d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
    return [
        (f"{d}.img_mod.lin", [f"{t}.norm1.linear"]),
        (f"{d}.txt_mod.lin", [f"{t}.norm1_context.linear"]),
        (f"{d}.img_attn.qkv", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v"]),
        (
            f"{d}.txt_attn.qkv",
            [f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj"],
        ),
        (f"{d}.img_attn.proj", [f"{t}.attn.to_out.0"]),
        (f"{d}.txt_attn.proj", [f"{t}.attn.to_add_out"]),
        (f"{d}.img_mlp.0", [f"{t}.ff.net.0.proj"]),
        (f"{d}.img_mlp.2", [f"{t}.ff.net.2"]),
        (f"{d}.txt_mlp.0", [f"{t}.ff_context.net.0.proj"]),
        (f"{d}.txt_mlp.2", [f"{t}.ff_context.net.2"]),
    ]


def _single(i: int) -> list[tuple[str, list[str]]]:
    s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    return [
        (f"{s}.linear1", [f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp"]),
        (f"{s}.linear2", [f"{t}.proj_out"]),
        (f"{s}.modulation.lin", [f"{t}.norm.linear"]),
    ]


def _norm_scales(num_double: int, num_single: int) -> list[tuple[str, str]]:
    out = []
    for i in range(num_double):
        d, t = f"double_blocks.{i}", f"transformer_blocks.{i}.attn"
        out += [
            (f"{d}.img_attn.norm.query_norm.scale", f"{t}.norm_q.weight"),
            (f"{d}.img_attn.norm.key_norm.scale", f"{t}.norm_k.weight"),
            (f"{d}.txt_attn.norm.query_norm.scale", f"{t}.norm_added_q.weight"),
            (f"{d}.txt_attn.norm.key_norm.scale", f"{t}.norm_added_k.weight"),
        ]
    for i in range(num_single):
        s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}.attn"
        out += [
            (f"{s}.norm.query_norm.scale", f"{t}.norm_q.weight"),
            (f"{s}.norm.key_norm.scale", f"{t}.norm_k.weight"),
        ]
    return out


def linear_map(num_double: int, num_single: int) -> list[tuple[str, list[str]]]:
    """(BFL linear module, its diffusers parts in stacking order) for a FLUX transformer."""
    pairs = _top_level()
    for i in range(num_double):
        pairs += _double(i)
    for i in range(num_single):
        pairs += _single(i)
    return pairs


def _count(keys: list[str], prefix: str) -> int:
    found = {int(k.split(".")[1]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def diffusers_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL names (fused, swapped)."""
    keys = list(state)
    n_double = _count(keys, "transformer_blocks.")
    n_single = _count(keys, "single_transformer_blocks.")
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in linear_map(n_double, n_single):
        for kind in ("weight", "bias"):
            if f"{parts[0]}.{kind}" not in state:
                continue  # a model without guidance embedding (schnell)
            value = torch.cat([state[f"{p}.{kind}"] for p in parts], dim=0)
            out[f"{bfl}.{kind}"] = _swap_halves(value) if bfl == SWAPPED else value
    for bfl, diff in _norm_scales(n_double, n_single):
        out[bfl] = state[diff]
    return out


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BFL FLUX transformer state dict (optionally under ``model.diffusion_model.``) in
    diffusers' names; split sizes come from the tensors."""
    state = {k.removeprefix("model.diffusion_model."): v for k, v in state.items()}
    keys = list(state)
    n_double = _count(keys, "double_blocks.")
    n_single = _count(keys, "single_blocks.")
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in linear_map(n_double, n_single):
        for kind in ("weight", "bias"):
            if f"{bfl}.{kind}" not in state:
                continue
            value = state[f"{bfl}.{kind}"]
            value = _swap_halves(value) if bfl == SWAPPED else value
            for part, piece in zip(parts, _split(state, bfl, value, len(parts)), strict=True):
                out[f"{part}.{kind}"] = piece
    for bfl, diff in _norm_scales(n_double, n_single):
        out[diff] = state[bfl]
    return out


def _split(state: dict[str, torch.Tensor], bfl: str, value: torch.Tensor, n: int) -> list:
    if n == 4:  # linear1: q, k, v (inner each) then the MLP (the rest)
        inner = state[bfl.replace("linear1", "linear2") + ".weight"].shape[0]
        return list(torch.split(value, [inner, inner, inner, value.shape[0] - 3 * inner]))
    return list(torch.chunk(value, n, dim=0))


def save_flux_single_file(transformer_dir: str | Path, path: str | Path) -> Path:
    """Write a diffusers transformer folder as one BFL-layout ``.safetensors`` file."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    model = FluxTransformer2DModel.from_pretrained(transformer_dir)
    state = {k: v.contiguous() for k, v in diffusers_to_bfl(model.state_dict()).items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return Path(path)


# --- LoRA ------------------------------------------------------------------------------------


def kohya_transformer_lora(
    peft_state: dict[str, torch.Tensor], out_features: dict[str, int], alpha: float
) -> dict[str, torch.Tensor]:
    """peft LoRA weights of a diffusers FLUX transformer (``<module>.lora_A.weight`` /
    ``lora_B``) as kohya ``lora_unet_<BFL>`` entries; ``out_features`` gives each diffusers
    Linear's output size (for the zero blocks of parts without a LoRA)."""
    n_double = _count(list(peft_state), "transformer_blocks.")
    n_single = _count(list(peft_state), "single_transformer_blocks.")
    out: dict[str, torch.Tensor] = {}
    for bfl, parts in linear_map(n_double, n_single):
        present = [p for p in parts if f"{p}.lora_A.weight" in peft_state]
        if not present:
            continue
        downs = [peft_state[f"{p}.lora_A.weight"] for p in present]
        rank = downs[0].shape[0]
        up = torch.zeros(sum(out_features[p] for p in parts), rank * len(present))
        row, slot = 0, 0
        for part in parts:
            if part in present:
                block = peft_state[f"{part}.lora_B.weight"]
                up[row : row + block.shape[0], slot * rank : (slot + 1) * rank] = block
                slot += 1
            row += out_features[part]
        name = f"lora_unet_{bfl.replace('.', '_')}"
        out[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{name}.lora_up.weight"] = (_swap_halves(up) if bfl == SWAPPED else up).contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha * len(present), dtype=torch.float32)
    return out
