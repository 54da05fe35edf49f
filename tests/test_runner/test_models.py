"""Tiny model builders, shipped tokenizer files and base-model loading (CPU, offline)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from gcs_emulator import FakeGCS  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPTokenizer  # noqa: E402

from kubetune.errors import UserError  # noqa: E402
from runner.models.loading import (  # noqa: E402
    Components,
    ModelSettings,
    download_prefix,
    load_model,
)
from runner.models.tiny import (  # noqa: E402
    TOKENIZER_DIR,
    build_tiny_sd,
    save_single_file,
)

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


# --- tokenizer files ---------------------------------------------------------------------


def test_shipped_tokenizer_is_the_real_clip_vocabulary() -> None:
    tok = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == CAT_IDS
    merges = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert len([m for m in merges[1:] if m]) == 48894
    assert tok.pad_token == "<|endoftext|>" and tok.model_max_length == 77


# --- tiny builders ------------------------------------------------------------------------


def _cat_image(pipe: Any) -> Any:
    """``pipe``'s image of "a photo of a cat" (2 steps, 64×64, seed 0) as a numpy array."""
    out = pipe("a photo of a cat", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (1, 64, 64, 3)
    return out


def test_tiny_sd_reloads_as_pipeline_and_generates(tiny_sd_dir: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert pipe.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert pipe.vae_scale_factor == 8
    out = _cat_image(pipe)
    assert float(abs(out).sum()) > 0 and not (out != out).any()
    assert _dir_size(tiny_sd_dir) < 30 * 2**20


def test_tiny_sdxl_reloads_as_pipeline_and_generates(tiny_sdxl_dir: Path) -> None:
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer_2.pad_token_id == 0
    assert pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.tokenizer_2("a photo of a cat").input_ids == CAT_IDS
    out = _cat_image(pipe)
    assert not (out != out).any()
    assert _dir_size(tiny_sdxl_dir) < 30 * 2**20


def test_tiny_builders_are_seeded_and_fast(tmp_path: Path, tiny_sd_dir: Path) -> None:
    start = time.perf_counter()
    same = build_tiny_sd(tmp_path / "same", seed=0)
    elapsed = time.perf_counter() - start
    other = build_tiny_sd(tmp_path / "other", seed=1)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert _sha(same / unet) == _sha(tiny_sd_dir / unet)
    assert _sha(same / "text_encoder/model.safetensors") == _sha(
        tiny_sd_dir / "text_encoder/model.safetensors"
    )
    assert _sha(other / unet) != _sha(tiny_sd_dir / unet)
    assert elapsed < 15, f"building the tiny SD model took {elapsed:.1f}s"


def test_tiny_cli_writes_a_model(tmp_path: Path) -> None:
    from runner.models.tiny import main

    main([str(tmp_path / "xl"), "--sdxl", "--seed", "3"])
    assert (tmp_path / "xl" / "text_encoder_2" / "config.json").exists()


# --- loading ------------------------------------------------------------------------------


def _load(model: str, cache_dir: str | Path | None = None, **fields: Any) -> Components:
    """``load_model`` with the settings given as keywords (``ModelSettings`` fields)."""
    return load_model(ModelSettings(model, **fields), cache_dir=cache_dir)


def test_load_components_from_sd_dir(tiny_sd_dir: Path) -> None:
    comps = _load(str(tiny_sd_dir))
    assert isinstance(comps, Components)
    assert comps.is_sdxl is False
    assert comps.tokenizer_2 is None and comps.text_encoder_2 is None
    assert comps.tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert comps.noise_scheduler.config.prediction_type == "epsilon"
    assert comps.unet.dtype == torch.float32
    assert not any(p.requires_grad for p in comps.unet.parameters())
    reference = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    assert _same_weights(comps.unet, reference)


def test_load_components_from_sdxl_dir_with_dtype_and_prediction_type(
    tiny_sdxl_dir: Path,
) -> None:
    comps = _load(str(tiny_sdxl_dir), weight_dtype="bfloat16", prediction_type="v_prediction")
    assert comps.is_sdxl is True
    assert comps.tokenizer_2.pad_token == "!"
    assert comps.text_encoder_2.__class__.__name__ == "CLIPTextModelWithProjection"
    assert comps.unet.dtype == torch.bfloat16 and comps.vae.dtype == torch.bfloat16
    assert comps.text_encoder_2.dtype == torch.bfloat16
    assert comps.noise_scheduler.config.prediction_type == "v_prediction"
    assert comps.noise_scheduler.__class__.__name__ == "DDPMScheduler"


def test_vae_override_from_dir_and_pipeline_dir(tmp_path: Path, tiny_sd_dir: Path) -> None:
    other = build_tiny_sd(tmp_path / "other", seed=5)
    vae_other = AutoencoderKL.from_pretrained(other, subfolder="vae")
    for vae_model in (str(other), str(other / "vae")):
        comps = _load(str(tiny_sd_dir), vae_model=vae_model)
        assert _same_weights(comps.vae, vae_other)
    base = _load(str(tiny_sd_dir))
    assert not _same_weights(base.vae, vae_other)


def test_hf_variant_is_used_and_missing_variant_falls_back(
    tmp_path: Path, tiny_sd_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    unet.save_pretrained(model / "unet", variant="fp16")
    with caplog.at_level(logging.DEBUG, logger="runner.models.loading"):
        comps = _load(str(model), hf_variant="fp16")
    assert _same_weights(comps.unet, unet)  # the variant file, not the plain one
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "fp16" in messages and "vae" in messages  # vae has no fp16 file: fell back
    # a local folder has what it has: the fallback is no warning (only a hub model's is)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_base_embeddings_sd(tmp_path: Path, tiny_sd_dir: Path) -> None:
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": vectors}, path)
    comps = _load(str(tiny_sd_dir), base_embeddings={"mystyle": str(path)})
    ids = comps.tokenizer.convert_tokens_to_ids(["mystyle", "mystyle_1"])
    assert ids == [49408, 49409]
    # multi-vector tokens are used in the expanded form ("mystyle mystyle_1"), as in diffusers
    assert comps.tokenizer("a mystyle mystyle_1 cat").input_ids == [
        49406,
        320,
        49408,
        49409,
        2368,
        49407,
    ]
    table = comps.text_encoder.get_input_embeddings().weight
    assert torch.equal(table[ids], vectors)
    reference = _load(str(tiny_sd_dir)).text_encoder.get_input_embeddings().weight
    assert torch.equal(table[:49408], reference)


def test_base_embeddings_sdxl_with_explicit_token(tmp_path: Path, tiny_sdxl_dir: Path) -> None:
    g = torch.Generator().manual_seed(2)
    clip_l, clip_g = torch.randn(1, 32, generator=g), torch.randn(1, 32, generator=g)
    path = tmp_path / "emb.safetensors"
    save_file({"clip_l": clip_l, "clip_g": clip_g}, path)
    comps = _load(str(tiny_sdxl_dir), base_embeddings={"<tok>": str(path)})
    for tok, enc, vec in (
        (comps.tokenizer, comps.text_encoder, clip_l),
        (comps.tokenizer_2, comps.text_encoder_2, clip_g),
    ):
        tid = tok.convert_tokens_to_ids("<tok>")
        assert tid == 49408
        assert torch.equal(enc.get_input_embeddings().weight[tid], vec[0])


def test_base_embeddings_wrong_width_is_a_user_error(tmp_path: Path, tiny_sd_dir: Path) -> None:
    path = tmp_path / "bad.safetensors"
    save_file({"emb_params": torch.zeros(1, 768)}, path)
    with pytest.raises(UserError, match="bad.safetensors"):
        _load(str(tiny_sd_dir), base_embeddings={"bad": str(path)})


def test_missing_model_is_a_user_error_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="nope"):
        _load(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        _load(str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["tiny.safetensors", "tiny.ckpt"])
def test_single_file_roundtrip(tmp_path: Path, tiny_sd_dir: Path, name: str) -> None:
    ckpt = save_single_file(tiny_sd_dir, tmp_path / name)
    comps = _load(str(ckpt), single_file_config=str(tiny_sd_dir))
    assert comps.is_sdxl is False
    ref = _load(str(tiny_sd_dir))
    assert _same_weights(comps.unet, ref.unet)
    assert _same_weights(comps.vae, ref.vae)
    assert _same_weights(comps.text_encoder, ref.text_encoder)
    assert comps.tokenizer("a photo of a cat").input_ids == CAT_IDS


def test_single_file_without_config_offline_is_a_user_error(
    tmp_path: Path, tiny_sd_dir: Path
) -> None:
    ckpt = save_single_file(tiny_sd_dir, tmp_path / "tiny.safetensors")
    with pytest.raises(UserError, match="tiny.safetensors"):
        _load(str(ckpt))


def test_download_prefix_from_a_local_store_once(tmp_path: Path, tiny_sd_dir: Path) -> None:
    from kubetune.storage import open_store

    store = open_store(str(tiny_sd_dir))
    local = download_prefix(store, tmp_path / "cache")
    assert _sha(local / "unet/diffusion_pytorch_model.safetensors") == _sha(
        tiny_sd_dir / "unet/diffusion_pytorch_model.safetensors"
    )
    marker_mtime = next(local.parent.glob("*.complete")).stat().st_mtime_ns
    assert download_prefix(store, tmp_path / "cache") == local  # cached: no second download
    assert next(local.parent.glob("*.complete")).stat().st_mtime_ns == marker_mtime
    comps = _load(str(local))
    assert comps.is_sdxl is False


def test_load_components_from_s3_prefix(
    tmp_path: Path, tiny_sd_dir: Path, s3_env: object, s3_bucket: str
) -> None:
    from kubetune.storage import open_store

    uri = f"s3://{s3_bucket}/models/tiny-sd"
    store = open_store(uri)
    for path in sorted(tiny_sd_dir.rglob("*")):
        if path.is_file():
            store.put_file(path.relative_to(tiny_sd_dir).as_posix(), path)
    comps = _load(uri, cache_dir=str(tmp_path / "cache"))
    assert _same_weights(comps.unet, _load(str(tiny_sd_dir)).unet)
    assert Path(comps.source).is_relative_to(tmp_path / "cache")


def test_load_components_from_a_gcs_prefix(
    tmp_path: Path, tiny_sd_dir: Path, gcs_env: FakeGCS
) -> None:
    """A base model under gs:// (fake-gcs-server; put there with its JSON API, which obstore's
    uploads cannot use: tests/gcs_emulator.py), downloaded once into the cache."""
    bucket = gcs_env.create_bucket()
    gcs_env.upload_tree(bucket, "models/tiny-sd", tiny_sd_dir)
    comps = _load(f"gs://{bucket}/models/tiny-sd", cache_dir=str(tmp_path / "cache"))
    assert _same_weights(comps.unet, _load(str(tiny_sd_dir)).unet)
    assert Path(comps.source).is_relative_to(tmp_path / "cache")


def test_hub_name_offline_is_a_user_error_naming_the_model() -> None:
    with pytest.raises(UserError, match="kubetune-test/no-such-model"):
        _load("kubetune-test/no-such-model")


# --- shipped sample data ------------------------------------------------------------------


def test_sample_data_matches_its_generator(tmp_path: Path) -> None:
    import importlib.util
    import json

    import numpy as np
    from PIL import Image

    examples = Path(__file__).resolve().parents[2] / "examples"
    spec = importlib.util.spec_from_file_location(
        "make_sample_data", examples / "make_sample_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.make_sample_data(tmp_path / "fresh")
    shipped = examples / "sample_data"
    assert _dir_size(shipped) < 200 * 1024
    rows = [json.loads(line) for line in (shipped / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 6
    for row in rows:
        image = shipped / row["image"]
        assert (shipped / f"{image.stem}.txt").read_text().strip() == row["text"]
        with Image.open(image) as a, Image.open(fresh / row["image"]) as b:
            assert a.size == (96, 96) and a.mode == "RGB"
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_load_components_from_pipeline_config(tiny_sd_dir: Path) -> None:
    from kubetune.config.pipelines import SdLoraConfig
    from runner.models.loading import load_model
    from runner.session.settings import model_settings

    cfg = SdLoraConfig.model_validate(
        {
            "model": str(tiny_sd_dir),
            "prediction_type": "v_prediction",
            "base_output_dir": "unused",
            "max_train_steps": 1,
            "save_every_n_steps": 1,
            "data_loader": {
                "type": "IMAGE_CAPTION_SD_DATA_LOADER",
                "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "unused"},
            },
        }
    )
    comps = load_model(model_settings(cfg))  # hf_variant defaults to fp16: falls back
    assert comps.unet.dtype == torch.bfloat16  # the config's default weight_dtype
    assert comps.noise_scheduler.config.prediction_type == "v_prediction"


def test_builtin_tiny_model_is_built_once_and_reused(tmp_path: Path) -> None:
    from runner.models.loading import builtin_model

    comps = _load("builtin:tiny-sd", cache_dir=tmp_path)
    assert not comps.is_sdxl
    target = builtin_model("tiny-sd", tmp_path)
    stamp = (target / "model_index.json").stat().st_mtime_ns
    assert builtin_model("tiny-sd", tmp_path) == target
    assert (target / "model_index.json").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "builtin").glob("*.partial-*"))
    with pytest.raises(UserError, match="builtin:tiny-sd"):
        builtin_model("huge-sd", tmp_path)


def test_a_builtin_model_built_by_two_ranks_at_once_is_installed_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two ranks of a torchrun start on an empty cache both build ``builtin:tiny-sd``; the one
    that finishes second must not delete the copy the first installed (that rank may be
    reading it already) but drop its own. Threads stand in for the ranks and the builder is
    replaced by one that writes a marker (the one fake: the race, not the model, is tested);
    the second build ends only once the first rank has its model."""
    import threading

    import runner.models.tiny as tiny
    from runner.models.loading import builtin_model

    both_building, first_done = threading.Barrier(2), threading.Event()

    def build(folder: Path) -> Path:
        both_building.wait(timeout=30)  # both saw no model_index.json
        if threading.current_thread().name == "second":
            assert first_done.wait(timeout=30)
        folder.mkdir(parents=True)
        (folder / "model_index.json").write_text(threading.current_thread().name)
        return folder

    monkeypatch.setattr(tiny, "build_tiny_sd", build)
    got: dict[str, Path] = {}

    def rank(name: str) -> None:
        got[name] = builtin_model("tiny-sd", tmp_path)
        if name == "first":
            first_done.set()

    threads = [threading.Thread(target=rank, args=(n,), name=n) for n in ("first", "second")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert got["first"] == got["second"]
    assert (got["first"] / "model_index.json").read_text() == "first"
    assert sorted(p.name for p in (tmp_path / "builtin").iterdir()) == ["tiny-sd"]


def test_a_hub_model_that_cannot_be_downloaded_says_why() -> None:
    """The Hub unreachable (offline here, as in a pod without egress) and the model not
    cached: say that, not diffusers' 'does not appear to have a file named model_index.json'
    (which reads as a wrong model name)."""
    from runner.models.loading import ModelError, _model_index

    with pytest.raises(ModelError) as err:
        _model_index("kubetune-tests/not-cached-anywhere")
    text = str(err.value)
    assert text.startswith("kubetune-tests/not-cached-anywhere: cannot download model_index.json")
    assert "not in the local cache" in text and "local diffusers folder" in text
    assert "does not appear to have" not in text
