"""Gradient checkpointing really runs (issue #12): the checkpointed text-encoder layers are
recomputed in the backward pass for textual inversion and text-encoder LoRA, and the
gradients equal those of a run without checkpointing (so the LoRA / vectors still train)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import make_config, reset_accelerate, training_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]


data_dir = training_images(n=2)


def one_backward(cfg: Any) -> tuple[int, dict[str, torch.Tensor]]:
    """Build the training objects as a run does, do one loss/backward; return how often the
    first text-encoder layer's attention ran and the trainable gradients."""
    from accelerate import Accelerator

    from runner.models.loading import load_model
    from runner.session.build import build_training
    from runner.session.settings import model_settings

    reset_accelerate()
    torch.manual_seed(0)
    comps = load_model(model_settings(cfg))
    pipe, _, _ = build_training(cfg, comps, Accelerator(cpu=True), total_steps=2)
    calls = []
    encoder = comps.text_encoder
    # A pre-hook on a submodule of the first layer: transformers 5 re-runs the layer's
    # ``forward`` (no hooks of its own) in the backward pass, and torch may stop that replay
    # early, before any forward hook would fire.
    layer = getattr(encoder, "text_model", encoder).encoder.layers[0].self_attn
    layer.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "id": ["a", "b"],
        "caption": ["a photo of <kbtn>", "a kbtn picture"],
        "original_size_hw": torch.tensor([[64, 64]] * 2),
        "crop_top_left_yx": torch.zeros(2, 2, dtype=torch.long),
    }
    pipe.loss(batch, torch.Generator().manual_seed(0)).backward()
    grads = {n: p.grad for n, p in pipe.trainable_parameters().items() if "text_encoder" in n}
    grads.update({n: p.grad for n, p in pipe.trainable_parameters().items() if n.startswith("ti")})
    return len(calls), grads


@pytest.mark.parametrize("kind", ["SD_TEXTUAL_INVERSION", "SD_LORA"])
def test_text_encoder_checkpointing_is_active_and_keeps_gradients(
    kind: str, tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    plain_calls, plain = one_backward(make_config(kind, tiny_sd_dir, data_dir, tmp_path))
    ckpt_calls, ckpt = one_backward(
        make_config(kind, tiny_sd_dir, data_dir, tmp_path, gradient_checkpointing=True)
    )
    assert plain_calls == 1
    assert ckpt_calls == 2, "the text encoder layer was not recomputed: checkpointing is off"
    assert plain and set(plain) == set(ckpt)
    # (LoRA A matrices get a zero gradient at step 0, their B being zero: check the sum.)
    assert sum(float(g.abs().sum()) for g in ckpt.values() if g is not None) > 0
    for name, grad in plain.items():
        assert ckpt[name] is not None, f"{name} lost its gradient under checkpointing"
        torch.testing.assert_close(ckpt[name], grad, rtol=1e-4, atol=1e-6)
