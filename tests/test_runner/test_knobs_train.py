"""Issue 15's knobs end to end on the tiny models: caption dropout is seeded and resumable,
EMA weights are what validation and export use, DoRA reloads in diffusers, every knob
resumes exactly after a stop, and leaving the knobs out (or setting them to their
defaults) trains bit-identically."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from train_support import (
    caption_loader,
    make_config,
    model_for,
    sample_latents,
    train,
    training_images,
    write_dataset,
)

from kubetune.errors import Preempted

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
OFF = dict(
    noise_offset=0.0,
    input_perturbation=0.0,
    timestep_sampling="uniform",
    zero_terminal_snr=False,
    loss_type="l2",
    ema_decay=None,
    ema_on_cpu=False,
    use_dora=False,
    lora_dropout=0.0,
)


data_dir = training_images(n=4)


def _checkpoint(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:06d}"


def _state(out: Path, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    folder = _checkpoint(out, step)
    state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)
    return load_file(folder / "trainable.safetensors"), state


# --- off means exactly as before -------------------------------------------------------------


@pytest.mark.slow
def test_knobs_at_their_defaults_train_bit_identically(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    common = dict(max_train_steps=3, save_every_n_steps=3, lora_checkpoint_format="invoke_peft")
    train(make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path / "plain", **common))
    explicit = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        tmp_path / "explicit",
        data_loader=caption_loader(data_dir, caption_dropout_rate=0.0),
        **common,
        **OFF,
    )
    train(explicit)
    plain, got = _state(tmp_path / "plain", 3)[0], _state(tmp_path / "explicit", 3)[0]
    assert plain.keys() == got.keys()
    assert all(torch.equal(plain[k], got[k]) for k in plain)


# --- caption dropout ----------------------------------------------------------------------


def _captions(loader: Any, batches: int | None = None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for i, batch in enumerate(loader):
        out += list(zip(batch["id"], batch["caption"], strict=True))
        if batches is not None and i + 1 == batches:
            break
    return out


def test_caption_dropout_rate_is_seeded_and_resumable(tmp_path: Path) -> None:
    from runner.data import build_train_dataloader

    data = write_dataset(tmp_path / "many", n=40)
    cfg = make_config(
        "SD_LORA",
        data,
        data,
        tmp_path,
        data_loader=caption_loader(data, caption_dropout_rate=0.3),
        train_batch_size=4,
    )

    def loader() -> Any:
        return build_train_dataloader(cfg, seed=3, batch_size=4, device_is_cuda=False)

    first = loader()
    epochs = [_captions(first) for _ in range(3)]
    rates = [sum(c == "" for _, c in e) / len(e) for e in epochs]
    assert all(len(e) == 40 for e in epochs)
    assert abs(sum(rates) / 3 - 0.3) < 0.1, rates
    dropped = [{i for i, c in e if c == ""} for e in epochs]
    assert dropped[0] != dropped[1], "each epoch drops other captions"
    again = loader()
    assert _captions(again) == epochs[0], "same seed, same dropped captions"
    resumed = loader()
    part = loader()
    _captions(part, batches=4)  # epoch 0 up to batch 4, then resume in a fresh loader
    resumed.load_state_dict(part.state_dict())
    assert _captions(resumed) == epochs[0][16:]
    assert _captions(resumed) == epochs[1]


# --- EMA ----------------------------------------------------------------------------------


def _kohya_key(name: str) -> str:
    """``unet.<path>.lora_A.default.weight`` → ``lora_unet_<path_with_>.lora_down.weight``."""
    path, _, rest = name.removeprefix("unet.").partition(".lora_")
    part = "lora_down" if rest.startswith("A") else "lora_up"
    return f"lora_unet_{path.replace('.', '_')}.{part}.weight"


def test_ema_weights_are_exported_and_differ_from_the_raw_ones(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        out,
        ema_decay=0.5,
        train_text_encoder=False,
        validation_prompts=["a kbtn picture"],
        validate_every_n_steps=4,
        num_validation_images_per_prompt=1,
    )
    train(cfg)
    raw, state = _state(out, 4)
    shadow = state["ema"]["shadow"]
    assert shadow.keys() == raw.keys()
    assert any(not torch.equal(shadow[k], raw[k]) for k in raw)
    for exported in (out / "final" / "lora.safetensors", _checkpoint(out, 4) / "lora.safetensors"):
        lora = load_file(exported)
        for name, value in shadow.items():
            assert torch.equal(lora[_kohya_key(name)], value), name
    assert (out / "validation" / "step-000004" / "grid.png").exists()


# --- DoRA ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_dora_exports_through_peft_and_reloads_in_diffusers(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "dora"
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        out,
        use_dora=True,
        lora_dropout=0.1,
        lora_checkpoint_format="invoke_peft",
        max_train_steps=2,
        save_every_n_steps=2,
    )
    train(cfg)
    trained = _state(out, 2)[0]
    magnitudes = {k: v for k, v in trained.items() if "lora_magnitude_vector" in k}
    assert magnitudes and any(k.startswith("unet.") for k in magnitudes)
    config = (out / "final" / "unet" / "adapter_config.json").read_text()
    assert '"use_dora": true' in config
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    before = sample_latents(pipe)
    pipe.load_lora_weights(out / "final")
    loaded = {n: p for n, p in pipe.unet.named_parameters() if "lora_magnitude_vector" in n}
    assert len(loaded) == sum(k.startswith("unet.") for k in magnitudes)
    for name, value in loaded.items():
        key = "unet." + name.replace(".default_0.", ".default.")
        torch.testing.assert_close(value.detach().float(), magnitudes[key])
    assert not torch.allclose(before, sample_latents(pipe)), "the DoRA did not change the output"


# --- exact resume with the knobs on -------------------------------------------------------

RESUME_CASES = {
    "sd-lora-all": (
        "SD_LORA",
        dict(
            noise_offset=0.1,
            input_perturbation=0.1,
            timestep_sampling="later",
            loss_type="huber",
            huber_c=0.2,
            zero_terminal_snr=True,
            prediction_type="v_prediction",
            ema_decay=0.7,
            use_dora=True,
            lora_dropout=0.2,
            lora_checkpoint_format="invoke_peft",
        ),
    ),
    "sdxl-lora-ti": (
        "SDXL_LORA_AND_TEXTUAL_INVERSION",
        dict(
            noise_offset=0.05,
            timestep_sampling="logit_normal",
            loss_type="smooth_l1",
            ema_decay=0.8,
            ema_on_cpu=True,
        ),
    ),
    "sd-ti": ("SD_TEXTUAL_INVERSION", dict(timestep_sampling="earlier", ema_decay=0.6)),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
@pytest.mark.slow
def test_stop_and_resume_is_exact_with_knobs_on(
    case: str, data_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A stop (the SIGTERM flag) after step 1 checkpoints; rerunning resumes and ends with
    the weights and EMA state of an uninterrupted run."""
    kind, knobs = RESUME_CASES[case]
    model = model_for(kind, request)
    extra: dict[str, Any] = dict(max_train_steps=4, save_every_n_steps=100, **knobs)
    if kind == "SD_LORA":
        extra["data_loader"] = caption_loader(data_dir, caption_dropout_rate=0.5)
    train(make_config(kind, model, data_dir, tmp_path / "ref", **extra))
    out = tmp_path / "run"
    cfg = make_config(kind, model, data_dir, out, **extra)
    stop = threading.Event()
    stop.set()
    with pytest.raises(Preempted):
        train(cfg, stop=stop)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]
    assert train(cfg).step == 4
    (want, want_state), (got, got_state) = _state(tmp_path / "ref", 4), _state(out, 4)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    for key, value in want_state["ema"]["shadow"].items():
        torch.testing.assert_close(got_state["ema"]["shadow"][key], value, rtol=0, atol=1e-6)


def test_caption_dropout_applies_to_dreambooth_captions(tmp_path: Path) -> None:
    from runner.data import build_train_dataloader

    data = write_dataset(tmp_path / "many", n=40)
    loader_cfg = {
        "type": "DREAMBOOTH_SD_DATA_LOADER",
        "instance_caption": "a photo of sks dog",
        "instance_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": str(data)},
        "resolution": 64,
        "caption_dropout_rate": 0.5,
    }
    cfg = make_config("SD_LORA", data, data, tmp_path, data_loader=loader_cfg)
    loader = build_train_dataloader(cfg, seed=3, batch_size=4, device_is_cuda=False)
    captions = [c for _, c in _captions(loader)]
    assert set(captions) == {"", "a photo of sks dog"}
    assert 0.3 < captions.count("") / len(captions) < 0.7
