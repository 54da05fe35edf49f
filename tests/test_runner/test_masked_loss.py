"""`use_masks`, the loss half: the mask (nearest-resized to the latent size) multiplies the
per-element error before the mean, Min-SNR weights the per-sample result afterwards (as
invoke-training does), a masked-out region cannot change the loss or the gradients, and every
training type trains with masks on the tiny models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from data_fixtures import write_masked_jsonl
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image
from train_support import TYPES, make_config, model_for, train

from runner.training.losses import diffusion_loss, snr

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
SCHEDULER = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_masked_loss_follows_invoke_trainings_order() -> None:
    """mse · nearest(mask) → mean over C,H,W (masked-out elements count as 0, no
    renormalisation) → × min-SNR weight per sample → mean over the batch."""
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    mask = (torch.rand(2, 1, 16, 16, generator=gen) > 0.5).float()
    t = torch.tensor([20, 700])
    small = F.interpolate(mask, size=(4, 4), mode="nearest")
    per_sample = ((pred - target) ** 2 * small).mean(dim=(1, 2, 3))
    ratio = snr(SCHEDULER, t)
    expected = (per_sample * torch.clamp(ratio, max=5.0) / ratio).mean()
    got = diffusion_loss(pred, target, t, SCHEDULER, "epsilon", 5.0, mask=mask)
    assert torch.allclose(got, expected)
    ones = torch.ones(2, 1, 16, 16)
    assert torch.equal(
        diffusion_loss(pred, target, t, SCHEDULER, "epsilon", 5.0, mask=ones),
        diffusion_loss(pred, target, t, SCHEDULER, "epsilon", 5.0),
    )


def test_masked_out_region_changes_neither_loss_nor_gradients(tiny_sd_dir: Path) -> None:
    """A real (tiny) UNet prediction: changing the target only where the mask is 0 leaves the
    loss and every UNet gradient bit-identical; changing it where the mask is 1 does not."""
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    gen = torch.Generator().manual_seed(1)
    size = 8  # latents of a 64-px image
    latents = torch.randn(2, 4, size, size, generator=gen)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=gen)
    t = torch.tensor([100, 800])
    mask = torch.ones(2, 1, size * 8, size * 8)
    mask[..., : size * 4] = 0  # left half of the image ignored
    target = torch.randn(latents.shape, generator=gen)
    outside = target.clone()
    outside[..., : size // 2] += 10 * torch.randn(outside[..., : size // 2].shape, generator=gen)
    inside = target.clone()
    inside[..., -1] += 1.0

    def loss_and_grads(tgt: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet.zero_grad()
        pred = unet(latents, t, hidden).sample
        loss = diffusion_loss(pred, tgt, t, SCHEDULER, "epsilon", 5.0, mask=mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    base_loss, base_grads = loss_and_grads(target)
    out_loss, out_grads = loss_and_grads(outside)
    in_loss, _ = loss_and_grads(inside)
    assert torch.equal(base_loss, out_loss)
    assert len(base_grads) > 10
    assert all(torch.equal(a, b) for a, b in zip(base_grads, out_grads, strict=True))
    assert not torch.equal(base_loss, in_loss)


def _masked_run(kind: str, request: pytest.FixtureRequest, tmp_path: Path, zero: bool) -> dict:
    jsonl = write_masked_jsonl(tmp_path / "data", [(64, 64), (80, 64), (64, 72), (64, 64)])
    if zero:  # every mask black: nothing left to learn from
        for mask in (tmp_path / "data" / "masks").iterdir():
            Image.new("L", Image.open(mask).size).save(mask)
    ti = "TEXTUAL_INVERSION" in kind
    loader = {
        "type": "TEXTUAL_INVERSION_SD_DATA_LOADER" if ti else "IMAGE_CAPTION_SD_DATA_LOADER",
        "dataset": {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(jsonl)},
        "resolution": 64,
        **({"caption_preset": "object"} if ti else {}),
    }
    model = model_for(kind, request)
    out = tmp_path / "out"
    cfg = make_config(
        kind,
        model,
        tmp_path,
        out,
        use_masks=True,
        data_loader=loader,
        max_train_steps=1,
        save_every_n_steps=1,
        log_every_n_steps=1,
    )
    train(cfg)
    return json.loads((out / "progress.json").read_text())


@pytest.mark.parametrize("kind", TYPES)
def test_every_type_trains_with_all_zero_masks_at_zero_loss(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    progress = _masked_run(kind, request, tmp_path, zero=True)
    assert progress["state"] == "completed" and progress["loss"] == 0.0


def test_real_masks_train_with_a_positive_loss(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    progress = _masked_run("SD_LORA", request, tmp_path, zero=False)
    assert progress["state"] == "completed" and 0.0 < progress["loss"] < 10.0
