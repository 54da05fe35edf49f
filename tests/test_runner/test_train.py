"""End-to-end training on the tiny models (CPU, offline): every type trains, checkpoints,
validates and writes outputs diffusers reloads; TI leaves other rows alone; loss falls;
seeds reproduce; SIGTERM checkpoints and resumes exactly; incompatible resumes fail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_support import (
    PLACEHOLDER,
    REPO,
    TYPES,
    checkpoint_weights,
    config_file,
    load_pipeline,
    make_config,
    model_for,
    sample_latents,
    step_dirs,
    stopped_and_resumed,
    train,
    training_images,
    write_dataset,
)

from kubetune.errors import ResumeMismatchError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]  # tiny_sd_dir / tiny_sdxl_dir
FORMAT = {
    "SD_LORA": "kohya",
    "SDXL_LORA": "invoke_peft",
    "SDXL_LORA_AND_TEXTUAL_INVERSION": "kohya",
}


data_dir = training_images(n=4)


# --- each type end to end --------------------------------------------------------------------


def _pipeline(kind: str, model: Path) -> Any:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if "SDXL" in kind else StableDiffusionPipeline
    pipe = cls.from_pretrained(model, **({} if "SDXL" in kind else {"safety_checker": None}))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load_embeddings(pipe: Any, path: Path, kind: str) -> None:
    if "SDXL" in kind:
        state = load_file(path)
        pipe.load_textual_inversion(
            state["clip_l"],
            token=PLACEHOLDER,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
        )
        pipe.load_textual_inversion(
            state["clip_g"],
            token=PLACEHOLDER,
            text_encoder=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer_2,
        )
    else:
        pipe.load_textual_inversion(str(path))


def check_reload(kind: str, model: Path, final: Path, trained: dict[str, torch.Tensor]) -> None:
    """The final outputs load into a fresh diffusers pipeline and change its output."""
    pipe = _pipeline(kind, model)
    prompt = "a kbtn picture"
    if "TEXTUAL_INVERSION" in kind:
        _load_embeddings(pipe, final / "kbtn.safetensors", kind)
        ids = pipe.tokenizer.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1"])
        loaded = pipe.text_encoder.get_input_embeddings().weight[ids]
        assert torch.equal(loaded, trained["ti.clip_l"])
        if "SDXL" in kind:
            loaded_g = pipe.text_encoder_2.get_input_embeddings().weight[
                pipe.tokenizer_2.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1"])
            ]
            assert torch.equal(loaded_g, trained["ti.clip_g"])
        prompt = f"a photo of {PLACEHOLDER}"
    before = sample_latents(pipe, prompt)
    if "LORA" in kind:
        if FORMAT[kind] == "kohya":
            keys = load_file(final / "lora.safetensors")
            assert any(k.startswith("lora_unet_") and k.endswith(".alpha") for k in keys)
            pipe.load_lora_weights(final, weight_name="lora.safetensors")
        else:
            assert (final / "unet" / "adapter_config.json").exists()
            pipe.load_lora_weights(final)
        after = sample_latents(pipe, prompt)
        assert not torch.allclose(before, after), "the LoRA did not change the output"
    if kind == "SDXL_FINETUNE":
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(final, subfolder="unet")
        after = sample_latents(pipe, prompt)
        assert not torch.allclose(before, after), "the trained UNet did not change the output"


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.slow
def test_type_trains_checkpoints_validates_and_reloads(
    kind: str, data_dir: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    model = model_for(kind, request)
    extra: dict[str, Any] = {
        "validation_prompts": [f"a photo of {PLACEHOLDER}"],
        "validate_every_n_steps": 4,
        "num_validation_images_per_prompt": 2,
        "max_checkpoints": 2,
    }
    if kind in FORMAT:
        extra["lora_checkpoint_format"] = FORMAT[kind]
    if "SDXL" in kind and "LORA" in kind:
        extra["text_encoder_2_learning_rate"] = 5e-4
    out = tmp_path / "run"
    result = train(
        make_config(kind, model, data_dir, out, max_train_steps=6, **extra),
    )
    assert result.step == 6
    assert step_dirs(out) == ["step-000004", "step-000006"]  # step 2 pruned (max 2)
    pngs = sorted(p.name for p in (out / "validation" / "step-000004").iterdir())
    assert pngs == ["grid.png", "prompt-0-0.png", "prompt-0-1.png", "thumb-0.jpg"]
    assert json.loads((out / "progress.json").read_text())["state"] == "completed"
    assert (out / "config.yaml").exists()
    check_reload(kind, model, out / "final", checkpoint_weights(out, 6))


# --- properties ------------------------------------------------------------------------------


def test_textual_inversion_changes_only_the_new_rows(
    tiny_sd_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    from runner.models.loading import load_model
    from runner.pipelines import build_pipeline
    from runner.session.settings import model_settings

    cfg = make_config(
        "SD_TEXTUAL_INVERSION",
        tiny_sd_dir,
        data_dir,
        tmp_path,
        optimizer={"optimizer_type": "AdamW", "learning_rate": 0.05, "weight_decay": 0.5},
    )
    comps = load_model(model_settings(cfg))
    table = comps.text_encoder.get_input_embeddings().weight.detach().clone()
    pipe = build_pipeline(cfg, comps, torch.device("cpu"), total_steps=3)
    new_ids = comps.tokenizer.convert_tokens_to_ids([PLACEHOLDER, f"{PLACEHOLDER}_1"])
    init = comps.text_encoder.get_input_embeddings().weight.detach().clone()
    optimizer = torch.optim.AdamW(pipe.param_groups(), weight_decay=0.5)
    batch = {
        "pixel_values": torch.rand(2, 3, 64, 64) * 2 - 1,
        "id": ["a", "b"],
        "caption": [f"a photo of {PLACEHOLDER} {PLACEHOLDER}_1"] * 2,
    }
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        pipe.loss(batch, generator).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = comps.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(after[: table.shape[0]], table)  # every original row, bit for bit
    assert torch.equal(after, init)  # the frozen table is untouched, new rows included
    vectors = pipe.trainable_parameters()["ti.clip_l"].detach()
    assert not torch.equal(vectors, init[new_ids]), "the new vectors did not train"
    ids = comps.tokenizer(["a photo of a cat"], return_tensors="pt").input_ids
    assert torch.equal(comps.text_encoder.get_input_embeddings()(ids), table[ids])


@pytest.mark.slow
def test_loss_decreases_when_overfitting_one_image(
    tiny_sd_dir: Path,
    tmp_path: Path,
) -> None:
    from runner.models.loading import load_model
    from runner.pipelines import build_pipeline
    from runner.session.settings import model_settings

    data = write_dataset(tmp_path / "one", n=1)
    # Attention-only LoRA barely moves a random-init UNet in a few dozen steps; LoRA on the
    # ResNet convs as well lets it fit the one image.
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data,
        tmp_path / "out",
        min_snr_gamma=None,
        lora_rank_dim=8,
        lora_alpha=8,  # scale 1 (invoke-training's default 1.0 would scale by 1/8)
        train_text_encoder=False,
        unet_lora_target_modules=[
            "to_q",
            "to_k",
            "to_v",
            "to_out.0",
            "conv1",
            "conv2",
            "conv_in",
            "conv_out",
        ],
    )
    torch.manual_seed(0)
    pipe = build_pipeline(cfg, load_model(model_settings(cfg)), torch.device("cpu"), total_steps=30)
    pixels = torch.from_numpy(np.asarray(Image.open(data / "img-0.png"), dtype=np.float32))
    batch = {
        "pixel_values": (pixels.permute(2, 0, 1)[None] / 127.5 - 1),
        "caption": ["a kbtn picture number 0"],
        "id": ["0"],
    }

    def eval_loss() -> float:
        generator = torch.Generator().manual_seed(123)
        with torch.no_grad():
            return sum(float(pipe.loss(batch, generator)) for _ in range(8)) / 8

    optimizer = torch.optim.AdamW(pipe.param_groups(), lr=1e-2)
    start = eval_loss()
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        pipe.loss(batch, generator).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert eval_loss() < 0.9 * start


@pytest.mark.slow
def test_same_seed_gives_identical_weights(
    tiny_sd_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = make_config(
            "SD_LORA",
            tiny_sd_dir,
            data_dir,
            tmp_path / name,
            seed=seed,
            max_train_steps=3,
            save_every_n_steps=3,
        )
        train(cfg)
        runs[name] = checkpoint_weights(tmp_path / name, 3)
    assert runs["a"].keys() == runs["b"].keys()
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


@pytest.mark.slow
def test_incompatible_checkpoint_needs_force_restart(
    tiny_sd_dir: Path,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    base = dict(max_train_steps=2, save_every_n_steps=2)
    train(
        make_config("SD_LORA", tiny_sd_dir, data_dir, out, **base),
    )
    changed = make_config("SD_LORA", tiny_sd_dir, data_dir, out, lora_rank_dim=8, **base)
    cli = subprocess.run(
        [sys.executable, "-m", "runner", str(config_file(changed, tmp_path / "changed.yaml"))],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 2, cli.stderr[-2000:]
    last = cli.stderr.strip().splitlines()[-1]
    assert last.startswith("kubetune: error: checkpoint step-000002") and "--force-restart" in last
    with pytest.raises(ResumeMismatchError, match="lora_rank_dim"):
        train(changed)
    result = train(changed, force_restart=True)
    assert result.step == 2
    info = json.loads((out / "checkpoints" / "step-000002" / "run_info.json").read_text())
    assert info["lora_rank_dim"] == 8


# --- SIGTERM and exact resume ----------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes_exactly(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    reference, out = stopped_and_resumed("SD_LORA", tiny_sd_dir, data_dir, tmp_path)
    expected, got = checkpoint_weights(reference, 6), checkpoint_weights(out, 6)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6)


# --- textual-inversion initialisation ------------------------------------------------------


def _ti_vectors(cfg: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    comps, pipe = load_pipeline(cfg, total_steps=1)
    return comps, {k: v.detach() for k, v in pipe.trainable_parameters().items()}


def test_ti_starts_from_phrase_or_embedding_file(
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from runner.checkpoint.exporters import export_embeddings

    phrase = make_config(
        "SDXL_TEXTUAL_INVERSION",
        tiny_sdxl_dir,
        data_dir,
        tmp_path,
        initializer_token=None,
        initial_phrase="red dog",
    )
    comps, vectors = _ti_vectors(phrase)
    red, dog = comps.tokenizer("red dog", add_special_tokens=False).input_ids
    table = comps.text_encoder.get_input_embeddings().weight
    assert torch.equal(vectors["ti.clip_l"], table[[red, dog]])  # one vector per token
    path = export_embeddings(
        tmp_path / "emb", PLACEHOLDER, [vectors["ti.clip_l"] + 1, vectors["ti.clip_g"] - 1]
    )
    from_file = make_config(
        "SDXL_TEXTUAL_INVERSION",
        tiny_sdxl_dir,
        data_dir,
        tmp_path,
        initializer_token=None,
        initial_embedding_file=str(path),
        num_vectors=2,
    )
    _, loaded = _ti_vectors(from_file)
    assert torch.equal(loaded["ti.clip_l"], vectors["ti.clip_l"] + 1)
    assert torch.equal(loaded["ti.clip_g"], vectors["ti.clip_g"] - 1)


@pytest.mark.slow
def test_cached_latents_and_text_match_uncached(
    tiny_sd_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    common = dict(
        max_train_steps=None,
        max_train_epochs=3,
        save_every_n_steps=None,
        save_every_n_epochs=3,
        train_text_encoder=False,
    )
    plain = make_config("SD_LORA", tiny_sd_dir, data_dir, tmp_path / "plain", **common)
    cached = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data_dir,
        tmp_path / "cached",
        cache_vae_outputs=True,
        cache_text_encoder_outputs=True,
        **common,
    )
    assert train(plain).step == train(cached).step == 6  # 4 images, batch 2, 3 epochs
    expected, got = (
        checkpoint_weights(tmp_path / "plain", 6),
        checkpoint_weights(tmp_path / "cached", 6),
    )
    # Batched and per-example encoding differ in the last float bits. With LoRA B starting at
    # zero (peft's default init, as invoke-training), early gradients of A and of the
    # time-embedding B sit near Adam's eps, where such noise grows to ~2e-5. The bound stays
    # a tenth of one optimizer step (lr 1e-3): a wrong cache moves weights by whole steps.
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-4)
