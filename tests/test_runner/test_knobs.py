"""Issue 15's knobs change training the way they should (units on the tiny models), and a
config that leaves them out draws exactly the random numbers it drew before them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import load_pipeline, make_config, training_images

from runner.training.ema import EmaWeights
from runner.training.losses import diffusion_loss, element_loss, snr
from runner.training.noise import NoiseSettings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
T = 1000


data_dir = training_images(n=4)


def _pipeline(cfg: Any) -> Any:
    torch.manual_seed(0)
    return load_pipeline(cfg)[1]


def _batch() -> dict[str, Any]:
    return {
        "pixel_values": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2
        - 1,
        "caption": ["a kbtn picture", "another kbtn picture"],
        "id": ["a", "b"],
    }


# --- off means exactly as before -------------------------------------------------------------


def test_knobs_off_draw_exactly_the_old_random_numbers(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The step's generator advances by the latent sample, the noise and the uniform
    timesteps, nothing more: the draws every run made before the knobs existed."""
    pipe = _pipeline(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path))
    batch = _batch()
    used = torch.Generator().manual_seed(5)
    pipe.loss(batch, used)
    expected = torch.Generator().manual_seed(5)
    latents = pipe.latents.sample(batch, torch.device("cpu"), expected)
    torch.randn(latents.shape, generator=expected)
    torch.randint(0, T, (2,), generator=expected)
    assert torch.equal(used.get_state(), expected.get_state())
    on = _pipeline(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, noise_offset=0.1))
    drew_more = torch.Generator().manual_seed(5)
    on.loss(batch, drew_more)
    assert not torch.equal(drew_more.get_state(), expected.get_state())  # the check can fail


# --- noise --------------------------------------------------------------------------------


def test_noise_offset_shifts_each_image_channel_by_one_value() -> None:
    noise = torch.zeros(64, 4, 8, 8)
    shifted = NoiseSettings(noise_offset=0.5).offset(noise, torch.Generator().manual_seed(0))
    per_channel = shifted[:, :, :1, :1]
    assert torch.equal(shifted, per_channel.expand_as(shifted))  # constant over H, W
    assert 0.4 < float(per_channel.std()) < 0.6
    assert NoiseSettings().offset(noise, torch.Generator()) is noise


def test_input_perturbation_noises_the_input_not_the_target(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import runner.pipelines.base as common

    cfg = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, input_perturbation=0.3)
    pipe = _pipeline(cfg)
    seen: dict[str, torch.Tensor] = {}
    add_noise = pipe.comps.noise_scheduler.add_noise
    target_of = common.training_target

    def spy_add(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["input"] = noise
        return add_noise(latents, noise, t)

    def spy_target(*args: Any) -> torch.Tensor:
        seen["target"] = args[3]
        return target_of(*args)

    monkeypatch.setattr(pipe.comps.noise_scheduler, "add_noise", spy_add)
    monkeypatch.setattr(common, "training_target", spy_target)
    pipe.loss(_batch(), torch.Generator().manual_seed(0))
    extra = (seen["input"] - seen["target"]) / 0.3
    assert 0.8 < float(extra.std()) < 1.2 and abs(float(extra.mean())) < 0.2


# --- timesteps ----------------------------------------------------------------------------


def _draw(strategy: str, **kwargs: Any) -> torch.Tensor:
    settings = NoiseSettings(timestep_sampling=strategy, **kwargs)
    return settings.timesteps(20000, T, torch.Generator().manual_seed(0))


def test_biased_samplers_lean_the_configured_way() -> None:
    uniform = _draw("uniform")
    assert torch.equal(
        uniform, torch.randint(0, T, (20000,), generator=torch.Generator().manual_seed(0))
    )
    # 4x weight on a quarter of the timesteps: that quarter gets 4/7 of the draws.
    earlier = _draw("earlier", bias_multiplier=4.0, bias_portion=0.25)
    later = _draw("later", bias_multiplier=4.0, bias_portion=0.25)
    assert abs(float((earlier < 250).float().mean()) - 4 / 7) < 0.02
    assert abs(float((later >= 750).float().mean()) - 4 / 7) < 0.02
    assert float(earlier.float().mean()) < 400 < 600 < float(later.float().mean())
    middle = _draw("logit_normal")
    assert int(middle.min()) >= 0 and int(middle.max()) < T
    # sigmoid(N(0,1)) lies in (0.25, 0.75) with probability P(|z| < ln 3) = 0.728
    assert abs(float(((middle >= 250) & (middle < 750)).float().mean()) - 0.728) < 0.02


def test_zero_terminal_snr_rescales_the_training_schedule(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        tmp_path,
        zero_terminal_snr=True,
        prediction_type="v_prediction",
    )
    pipe = _pipeline(cfg)
    scheduler = pipe.comps.noise_scheduler
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    assert float(snr(scheduler, torch.tensor([T - 1]))) == 0.0
    assert scheduler.config.timestep_spacing == "trailing"
    assert torch.isfinite(pipe.loss(_batch(), torch.Generator().manual_seed(0)))


# --- losses -------------------------------------------------------------------------------


def test_huber_losses_are_quadratic_near_zero_and_linear_far_away() -> None:
    pred, target = torch.tensor([0.0, 0.001, 10.0]), torch.zeros(3)
    huber = element_loss(pred, target, "huber", 0.1)
    smooth = element_loss(pred, target, "smooth_l1", 0.1)
    assert float(huber[0]) == 0.0
    torch.testing.assert_close(huber[1], torch.tensor(0.001**2), rtol=1e-3, atol=0)
    torch.testing.assert_close(huber[2], torch.tensor(2 * 0.1 * (10 - 0.1)), rtol=1e-3, atol=0)
    torch.testing.assert_close(smooth, huber / 0.1)
    assert torch.equal(element_loss(pred, target), (pred - target) ** 2)


def test_huber_combines_with_min_snr_weighting(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    pipe = _pipeline(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path))
    scheduler = pipe.comps.noise_scheduler
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    got = diffusion_loss(pred, target, t, scheduler, "epsilon", 5.0, loss_type="huber")
    ratio = snr(scheduler, t)
    weights = torch.clamp(ratio, max=5.0) / ratio
    per_sample = element_loss(pred, target, "huber", 0.1).mean(dim=(1, 2, 3))
    torch.testing.assert_close(got, (per_sample * weights).mean())
    plain = diffusion_loss(pred, target, t, scheduler, "epsilon", 5.0)
    assert not torch.allclose(got, plain)


# --- EMA ----------------------------------------------------------------------------------


def test_ema_averages_swaps_in_and_restores() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    ema = EmaWeights({"p": param}, decay=0.5, device=torch.device("cpu"))
    with torch.no_grad():
        param.fill_(4.0)
    ema.update()  # 0.5 * 0 + 0.5 * 4
    ema.update()  # 0.5 * 2 + 0.5 * 4
    assert torch.equal(ema.shadow["p"], torch.full((3,), 3.0))
    with ema.applied():
        assert torch.equal(param.detach(), torch.full((3,), 3.0))
    assert torch.equal(param.detach(), torch.full((3,), 4.0))
    other = EmaWeights({"p": torch.nn.Parameter(torch.ones(3))}, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["p"], ema.shadow["p"])


def test_resume_refuses_a_dora_or_ema_switch_and_accepts_older_checkpoints(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from kubetune.errors import ResumeMismatchError
    from runner.checkpoint.state import check_compatible
    from runner.session.settings import compat_info

    plain = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path)
    older = {k: v for k, v in compat_info(plain).items() if k not in ("use_dora", "ema")}
    # written before the knobs existed: still resumes
    check_compatible(older, compat_info(plain), 2)
    for knob in ({"ema_decay": 0.9}, {"use_dora": True, "lora_checkpoint_format": "invoke_peft"}):
        switched = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, **knob)
        with pytest.raises(ResumeMismatchError, match="ema|use_dora"):
            check_compatible(older, compat_info(switched), 2)
        check_compatible(compat_info(switched), compat_info(switched), 2)


def test_validation_images_come_from_the_ema_weights(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    from kubetune.storage import open_store
    from runner.session.settings import validation_settings
    from runner.training.validation import Validator

    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        tmp_path,
        ema_decay=0.9,
        validation_prompts=["a kbtn picture"],
        validate_every_n_steps=1,
    )
    pipe = _pipeline(cfg)
    assert pipe.ema is not None
    for shadow in pipe.ema.shadow.values():
        shadow.add_(1.0)  # make the average visibly different from the raw weights
    raw = {k: p.detach().clone() for k, p in pipe.trainable_parameters().items()}
    seen: dict[str, torch.Tensor] = {}

    def generate(self: Validator) -> list[list[Image.Image]]:
        seen.update({k: p.detach().clone() for k, p in pipe.trainable_parameters().items()})
        return [[Image.new("RGB", (8, 8))]]

    monkeypatch.setattr(Validator, "_generate", generate)
    store = open_store(str(tmp_path / "store"))
    Validator(validation_settings(cfg), pipe, store, torch.device("cpu")).validate(1)
    assert all(torch.equal(seen[k], pipe.ema.shadow[k]) for k in raw)
    assert all(torch.equal(p.detach(), raw[k]) for k, p in pipe.trainable_parameters().items())


def test_min_snr_stays_finite_at_the_zero_snr_timestep() -> None:
    from diffusers import DDPMScheduler

    from runner.training.noise import zero_terminal_snr_scheduler

    scheduler = zero_terminal_snr_scheduler(DDPMScheduler(prediction_type="v_prediction"))
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([T - 1, 10])
    loss = diffusion_loss(pred, target, t, scheduler, "v_prediction", 5.0)
    assert torch.isfinite(loss)
    per_sample = element_loss(pred, target).mean(dim=(1, 2, 3))
    ratio = snr(scheduler, t[1:])
    expected = (per_sample[0] * 2 + per_sample[1] * (torch.clamp(ratio, max=5.0) / ratio + 1)) / 2
    torch.testing.assert_close(loss, expected.squeeze())


def test_lora_dropout_seeds_its_masks_on_the_host_per_step_and_micro_batch(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """``lora_dropout`` reaches the pipeline as its own setting (no config probing); a TI
    pipeline has none. Its masks come from a seed of (generator seed, step, micro-batch)
    computed on the host (no device draw, no sync): the step generator advances exactly as
    without dropout, the same (step, micro-batch) gives the same masks, another one others."""
    on = _pipeline(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path, lora_dropout=0.5))
    off = _pipeline(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path))
    ti = _pipeline(make_config("SD_TEXTUAL_INVERSION", tiny_sd_dir, data_dir, tmp_path))
    assert (on.lora_dropout, off.lora_dropout, ti.lora_dropout) == (0.5, 0.0, 0.0)
    with torch.no_grad():  # B = 0 would hide the dropout: give the adapters an output
        for name, param in on.trainable_parameters().items():
            if "lora_B" in name:
                param.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))

    def loss(step: int | None) -> tuple[torch.Tensor, list]:
        """The next micro-batch's loss (a new step first unless None), same noise draws."""
        if step is not None:
            on.before_step(step)
        generator = torch.Generator().manual_seed(5)
        return on.loss(_batch(), generator), generator.get_state().tolist()

    first, state = loss(0)
    g_off = torch.Generator().manual_seed(5)
    off.loss(_batch(), g_off)
    assert state == g_off.get_state().tolist()  # no extra draw from the step generator
    second_micro_batch = loss(None)[0]
    assert torch.equal(loss(0)[0], first)  # the same step and micro-batch: the same masks
    assert not torch.equal(second_micro_batch, first)
    assert not torch.equal(loss(1)[0], first)
