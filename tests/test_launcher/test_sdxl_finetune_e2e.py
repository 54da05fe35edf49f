"""SDXL_FINETUNE with what every other type has (issue #25): an S3 dataset and S3 outputs on
the real SeaweedFS server, webhooks, the report, pruned checkpoints (manifest last), and
`launcher pull` of the final UNet, which loads into a StableDiffusionXLPipeline and changes
its output; a sweep over a fine-tune config expands into valid members."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from train_support import make_config, s3_dataset, sample_latents, train
from webhook_receiver import WebhookReceiver

from kubetune.storage import open_store
from launcher.cli.main import main
from launcher.sweeps import expand, parse_axes

UNET_FILES = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
SAMPLES = Path(__file__).parents[1] / "data" / "invoke_training_samples"


@pytest.mark.slow
def test_s3_fine_tune_notifies_reports_prunes_and_pulls_a_loadable_unet(
    s3_env: Any, s3_bucket: str, tmp_path: Path, tiny_sdxl_dir: Path
) -> None:
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    data = s3_dataset(tmp_path / "data", s3_bucket)
    storage = {"bucket": s3_bucket, "prefix": "runs", "endpoint_url": s3_env.endpoint}
    with WebhookReceiver() as hook:
        cfg = make_config(
            "SDXL_FINETUNE", tiny_sdxl_dir, data,  # type: ignore[arg-type]
            tmp_path / "unused" / "ft", storage=storage,
            max_checkpoints=1, validation_prompts=["a kbtn picture"], validate_every_n_steps=2,
            num_validation_images_per_prompt=1, notify={"webhooks": [{"url": hook.url}]},
        )  # fmt: skip
        assert cfg.data_loader.dataset.dataset_dir.startswith("s3://")
        result = train(cfg)
    uri = result.output_uri
    assert uri.startswith("s3://")
    assert hook.events()[0] == "started" and hook.events()[-1] == "succeeded"
    assert hook.events().count("checkpoint") == 2
    store = open_store(uri, cfg.storage)
    steps = sorted({o.key.split("/")[1] for o in store.list("checkpoints/")})
    assert steps == ["step-000004"]  # max_checkpoints 1: step 2 pruned
    assert "completed" in store.get_bytes("report.html").decode()

    dest = tmp_path / "pulled"
    pulled = CliRunner().invoke(main, ["pull", uri, "-o", str(dest)])
    assert pulled.exit_code == 0, pulled.output
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert files == UNET_FILES
    unet = UNet2DConditionModel.from_pretrained(dest, subfolder="unet")
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    before = sample_latents(pipe)
    pipe.unet = unet
    assert not torch.allclose(before, sample_latents(pipe)), "the pulled UNet changed nothing"


def test_a_sweep_over_a_fine_tune_sample_expands_into_valid_members() -> None:
    axes = parse_axes(["save_dtype=float16,bfloat16", "optimizer.learning_rate=1e-5,2e-5"])
    _, members = expand(SAMPLES / "sdxl_finetune_robocats_1x24gb.yaml", (), None, axes)
    got = {(m.config.save_dtype, m.config.optimizer.learning_rate) for m in members}
    assert got == {("float16", 1e-5), ("float16", 2e-5), ("bfloat16", 1e-5), ("bfloat16", 2e-5)}
    assert all(m.config.type == "SDXL_FINETUNE" for m in members)


def test_the_ui_tab_puts_the_save_format_beside_the_model_as_invoke_training() -> None:
    """invoke-training's SDXL fine-tune tab shows Checkpoint Format and Save Dtype with the
    model; the generated tab does too, with the schema's choices and defaults."""
    from kubetune.config import SdxlFinetuneConfig
    from launcher.ui.forms import forms

    (tab,) = forms([SdxlFinetuneConfig])
    widgets = {w["path"]: w for w in tab["widgets"]}
    fmt, dtype = widgets["save_checkpoint_format"], widgets["save_dtype"]
    assert (fmt["section"], fmt["advanced"], dtype["section"]) == ("Basic", False, "Basic")
    assert fmt["choices"] == ["full_diffusers", "trained_only_diffusers"]
    assert (fmt["default"], dtype["default"]) == ("trained_only_diffusers", "float16")
