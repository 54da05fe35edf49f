"""Advice on a valid config: combinations that train, but not as the user likely means
(``launcher validate`` prints them as warnings; the runner logs them at start).

The fields keep invoke-training's meaning (``weight_dtype``: the frozen weights' dtype;
``mixed_precision``: accelerate's autocast), so kubetune warns instead of changing them.
"""

from __future__ import annotations

from typing import Any

LORA_TYPES = ("SD_LORA", "SDXL_LORA", "SDXL_LORA_AND_TEXTUAL_INVERSION")


def precision_warnings(cfg: Any) -> list[str]:
    """One line per weight_dtype / mixed_precision pair that trains slower or less safely
    than the matching pair would."""
    out: list[str] = []
    weights, mixed = getattr(cfg, "weight_dtype", None), getattr(cfg, "mixed_precision", None)
    if weights is None or mixed is None:  # a type without the pair (FLUX_LORA)
        return out
    if weights == "float16" and mixed != "fp16":
        out.append(
            f"weight_dtype: float16 with mixed_precision: {mixed} trains without "
            "loss scaling: gradients through the float16 model can underflow to zero; set "
            "mixed_precision: fp16 (GradScaler) or weight_dtype: bfloat16"
        )
    if weights == "bfloat16" and mixed == "no" and cfg.type in LORA_TYPES:
        given = {"weight_dtype", "mixed_precision"} & getattr(cfg, "model_fields_set", set())
        out.append(
            "weight_dtype: bfloat16 with mixed_precision: no"
            + ("" if given else " (the defaults)")
            + " runs the (float32) LoRA layers in "
            "float32 and casts around each one (slower on a GPU); set mixed_precision: bf16 "
            "to compute them in bf16 (the trained weights stay float32)"
        )
    return out
