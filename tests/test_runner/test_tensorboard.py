"""TensorBoard as invoke-training logs it (issue #12): every param group's learning rate and
the validation images, read back from the event files a real tiny training run wrote."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from train_support import make_config, model_for, train, write_dataset

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]


def event_tags(logs: Path) -> dict[str, list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    return events.Tags()


@pytest.mark.parametrize(
    ("kind", "groups"),
    [
        ("SD_LORA", ["unet", "text_encoder"]),
        (
            "SDXL_LORA_AND_TEXTUAL_INVERSION",
            ["unet", "text_encoder_1", "text_encoder_2", "ti_embeddings_1", "ti_embeddings_2"],
        ),
    ],
)
def test_every_group_lr_and_validation_images_reach_tensorboard(
    kind: str, groups: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    model = model_for(kind, request)
    data = write_dataset(tmp_path / "data", n=2)
    out = tmp_path / "out"
    cfg = make_config(
        kind,
        model,
        data,
        out,
        report_to="tensorboard",
        max_train_steps=2,
        save_every_n_steps=2,
        log_every_n_steps=1,
        validation_prompts=["a kbtn picture", "a photo of <kbtn>"],
        validate_every_n_steps=2,
        num_validation_images_per_prompt=2,
        num_validation_inference_steps=2,
    )
    train(cfg)
    tags = event_tags(out / "logs")
    assert {f"lr/{g}" for g in groups} <= set(tags["scalars"]), tags["scalars"]
    assert {"validation/prompt-0", "validation/prompt-1"} <= set(tags["images"])
