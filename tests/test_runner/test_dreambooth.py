"""DREAMBOOTH_SD_DATA_LOADER with invoke-training's fields and defaults: instance (+ optional
class) image folders with fixed captions, balanced instance/class batches, class examples
weighted by `class_data_loss_weight`, resumable mid-epoch, training on the tiny models."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from data_fixtures import upload_tree, write_image_dir
from s3server import S3Server
from train_support import make_config, model_for, step_dirs, train

from kubetune.config import DreamboothSDDataLoaderConfig, SdLoraConfig, parse_config
from kubetune.errors import ConfigError, DataError
from runner.data import build_train_dataloader, preflight

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(120)

YAML = """\
type: SD_LORA
base_output_dir: output/dog
max_train_steps: 10
save_every_n_steps: 5
data_loader:
  type: DREAMBOOTH_SD_DATA_LOADER
  instance_caption: a photo of sks dog
  instance_dataset:
    type: IMAGE_DIR_DATASET
    dataset_dir: data/dog
"""
BUCKETS = {"target_resolution": 32, "start_dim": 16, "end_dim": 64, "divisible_by": 8}


def db_config(
    instance: str, klass: str | None = None, kind: str = "SD_LORA", **loader: Any
) -> SdLoraConfig:
    data: dict[str, Any] = {
        "type": "DREAMBOOTH_SD_DATA_LOADER",
        "instance_caption": "a photo of sks dog",
        "instance_dataset": {"type": "IMAGE_DIR_DATASET", "dataset_dir": instance},
        "resolution": 32,
    }
    if klass is not None:
        data["class_dataset"] = {"type": "IMAGE_DIR_DATASET", "dataset_dir": klass}
        data["class_caption"] = "a photo of a dog"
    raw = {
        "type": kind,
        "base_output_dir": "/tmp/kubetune-test-out",
        "max_train_steps": 10,
        "save_every_n_steps": 5,
        "data_loader": {**data, **loader},
    }
    return parse_config(yaml.safe_dump(raw))


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[str, str]:
    """3 instance images and 5 class images of mixed sizes."""
    write_image_dir(tmp_path / "inst", [(40, 32), (32, 48), (36, 36)], captions=False)
    sizes = [(64, 32), (30, 30), (32, 60), (48, 40), (33, 33)]
    write_image_dir(tmp_path / "cls", sizes, captions=False, exts=(".jpg", ".png"))
    return str(tmp_path / "inst"), str(tmp_path / "cls")


def _kinds(batch: dict[str, Any]) -> list[str]:
    return [i.split("/", 1)[0] for i in batch["id"]]


def _epoch(cfg: SdLoraConfig, batch_size: int = 2, seed: int = 5) -> list[dict[str, Any]]:
    loader = build_train_dataloader(cfg, seed=seed, batch_size=batch_size, device_is_cuda=False)
    batches = list(loader)
    assert len(batches) == len(loader)
    return batches


# --- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["SD_LORA", "SDXL_LORA"])
def test_dreambooth_config_has_invoke_trainings_defaults(kind: str) -> None:
    cfg = parse_config(YAML.replace("SD_LORA", kind))
    loader = cfg.data_loader
    assert isinstance(loader, DreamboothSDDataLoaderConfig)
    assert loader.class_dataset is None and loader.class_caption is None
    assert loader.class_data_loss_weight == 1.0
    assert (loader.resolution, loader.center_crop, loader.random_flip) == (512, True, False)
    assert loader.aspect_ratio_buckets is None and loader.dataloader_num_workers == 0
    assert loader.instance_dataset.keep_in_memory is False


def test_class_dataset_needs_a_class_caption() -> None:
    text = YAML + "  class_dataset: {type: IMAGE_DIR_DATASET, dataset_dir: data/dogs}\n"
    with pytest.raises(ConfigError, match=r"data_loader\.class_caption: class_dataset needs"):
        parse_config(text, name="c.yaml")
    assert parse_config(text + "  class_caption: a dog\n").data_loader.class_caption == "a dog"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "SD_TEXTUAL_INVERSION"}, "data_loader"),
        ({"use_masks": True}, "use_masks"),
    ],
)
def test_dreambooth_is_refused_where_invoke_training_refuses_it(
    change: dict[str, Any], field: str
) -> None:
    raw = {**yaml.safe_load(YAML), **change}
    if raw["type"] == "SD_TEXTUAL_INVERSION":
        raw.update(placeholder_token="<x>", initializer_token="dog")
    with pytest.raises(ConfigError, match=rf"c\.yaml:\d+: {field}"):
        parse_config(yaml.safe_dump(raw, sort_keys=False), name="c.yaml")


# --- batches ---------------------------------------------------------------------------------


def test_batches_balance_instance_and_class_examples(dirs: tuple[str, str]) -> None:
    """No buckets: examples alternate instance / class, so every batch of 2 holds one of each;
    an epoch is min(#instance, #class) = 3 of each, the 5 class images rotating over epochs."""
    cfg = db_config(*dirs, class_data_loss_weight=0.25)
    loader = build_train_dataloader(cfg, seed=5, batch_size=2, device_is_cuda=False)
    seen_class: set[str] = set()
    for _ in range(4):
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            assert sorted(_kinds(batch)) == ["class", "instance"]
            for kind, caption, weight in zip(
                _kinds(batch), batch["caption"], batch["loss_weight"].tolist(), strict=True
            ):
                expected = ("a photo of sks dog", 1.0) if kind == "instance" else None
                assert (caption, weight) == (expected or ("a photo of a dog", 0.25))
            assert batch["loss_weight"].dtype == torch.float32
        ids = [i for b in batches for i in b["id"]]
        assert len(set(ids)) == 6
        assert sum(i.startswith("instance/") for i in ids) == 3
        seen_class |= {i for i in ids if i.startswith("class/")}
    assert len(seen_class) == 5
    covered = sorted(i for b in loader.sampler.cover_batches() for i in b)
    assert covered == list(range(8)), "cache filling sees every instance and class image"


def test_bucketed_batches_alternate_instance_and_class(dirs: tuple[str, str]) -> None:
    """With aspect-ratio buckets a batch is one bucket, so whole batches alternate."""
    cfg = db_config(*dirs, aspect_ratio_buckets=BUCKETS)
    batches = _epoch(cfg)
    kinds = [set(_kinds(b)) for b in batches]
    assert all(len(k) == 1 for k in kinds)
    assert [k.pop() for k in kinds] == ["instance", "class"] * (len(batches) // 2)
    for batch in batches:
        assert batch["pixel_values"].shape[-2:] != (0, 0)


def test_without_class_dataset_every_instance_image_once(dirs: tuple[str, str]) -> None:
    batches = _epoch(db_config(dirs[0]))
    ids = sorted(i for b in batches for i in b["id"])
    assert ids == ["instance/img-000.png", "instance/img-001.png", "instance/img-002.png"]
    assert all(b["loss_weight"].tolist() == [1.0] * len(b["id"]) for b in batches)
    assert {c for b in batches for c in b["caption"]} == {"a photo of sks dog"}


@pytest.mark.parametrize("buckets", [None, BUCKETS], ids=["fixed", "buckets"])
def test_resume_mid_epoch_gives_exactly_the_remaining_batches(
    dirs: tuple[str, str], buckets: dict[str, int] | None
) -> None:
    cfg = db_config(*dirs, aspect_ratio_buckets=buckets, random_flip=True, center_crop=False)
    first = build_train_dataloader(cfg, seed=9, batch_size=2, device_is_cuda=False)
    list(first)  # epoch 0
    it = iter(first)
    next(it)
    state = first.state_dict()
    rest = list(it) + list(first)  # rest of epoch 1, then epoch 2
    again = build_train_dataloader(cfg, seed=9, batch_size=2, device_is_cuda=False)
    again.load_state_dict(state)
    resumed = list(again) + list(again)
    assert [b["id"] for b in resumed] == [b["id"] for b in rest]
    for a, b in zip(resumed, rest, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"])
        assert torch.equal(a["loss_weight"], b["loss_weight"])


def test_preflight_checks_both_folders(dirs: tuple[str, str]) -> None:
    assert preflight(db_config(*dirs)).num_examples == 8
    (Path(dirs[1]) / "img-003.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"cls/img-003\.png: not a readable image"):
        preflight(db_config(*dirs))
    with pytest.raises(DataError, match=r"nowhere: no such folder"):
        preflight(db_config(dirs[0], str(Path(dirs[0]).parent / "nowhere")))


def test_folders_on_s3(s3_env: S3Server, s3_bucket: str, dirs: tuple[str, str]) -> None:
    client = s3_env.client()
    upload_tree(client, s3_bucket, "db/inst", Path(dirs[0]))
    upload_tree(client, s3_bucket, "db/cls", Path(dirs[1]))
    batches = _epoch(db_config(f"s3://{s3_bucket}/db/inst", f"s3://{s3_bucket}/db/cls"))
    assert Counter(k for b in batches for k in _kinds(b)) == {"instance": 3, "class": 3}


# --- the loss and training -------------------------------------------------------------------


def test_class_weight_scales_class_examples_in_the_loss(
    tiny_sd_dir: Path, dirs: tuple[str, str], tmp_path: Path
) -> None:
    """Same step, same random draws: the loss is linear in the class weight, the class
    examples' share scaled by it (per-sample mean × Min-SNR weight × loss weight)."""
    from runner.models.loading import load_model
    from runner.pipelines import build_pipeline
    from runner.session.load import place_models
    from runner.session.settings import model_settings

    cfg = make_config("SD_LORA", tiny_sd_dir, Path(dirs[0]), tmp_path / "out")
    comps = load_model(model_settings(cfg))
    place_models(comps, cfg.weight_dtype, torch.device("cpu"))
    pipeline = build_pipeline(cfg, comps, torch.device("cpu"), total_steps=1)
    batch = _epoch(db_config(*dirs, resolution=64))[0]
    is_class = torch.tensor([k == "class" for k in _kinds(batch)])

    def loss(weight: float) -> float:
        batch["loss_weight"] = torch.where(is_class, weight, 1.0)
        with torch.no_grad():
            return float(pipeline.loss(batch, torch.Generator().manual_seed(0)))

    l0, l1, l3 = loss(0.0), loss(1.0), loss(3.0)
    assert l1 != l0
    assert l3 == pytest.approx(l0 + 3 * (l1 - l0), rel=1e-5)


@pytest.mark.parametrize(
    ("kind", "with_class"), [("SD_LORA", True), ("SDXL_LORA", False)], ids=["sd", "sdxl"]
)
def test_trains_with_and_without_a_class_dataset(
    kind: str, with_class: bool, dirs: tuple[str, str], tmp_path: Path, request: Any
) -> None:
    model = model_for(kind, request)
    loader = db_config(*(dirs if with_class else dirs[:1]), resolution=32).data_loader
    out = tmp_path / "out"
    cfg = make_config(
        kind,
        model,
        Path(dirs[0]),
        out,
        data_loader=loader.model_dump(),
        max_train_steps=1,
        save_every_n_steps=1,
    )
    result = train(cfg)
    assert result.step == 1 and step_dirs(out) == ["step-000001"]
    assert any(k.startswith("final/") for k in result.final_keys)


@pytest.mark.parametrize(("instance", "klass"), [(True, False), (False, True)])
def test_keep_in_memory_is_read_per_dataset(
    dirs: tuple[str, str], instance: bool, klass: bool
) -> None:
    """As in invoke-training, `instance_dataset.keep_in_memory` and
    `class_dataset.keep_in_memory` each keep only their own images decoded."""
    inst, cls = dirs
    cfg = db_config(
        inst,
        cls,
        instance_dataset={
            "type": "IMAGE_DIR_DATASET",
            "dataset_dir": inst,
            "keep_in_memory": instance,
        },
        class_dataset={"type": "IMAGE_DIR_DATASET", "dataset_dir": cls, "keep_in_memory": klass},
    )
    loader = build_train_dataloader(cfg, seed=5, batch_size=2, device_is_cuda=False)
    for _ in range(2):
        list(loader)
    dataset = loader.dataset
    assert dataset.memory is not None
    kept = {dataset.source.records[i].id.split("/", 1)[0]
            for i in range(len(dataset)) if dataset.memory.get(i) is not None}  # fmt: skip
    assert kept == ({"instance"} if instance else {"class"})
