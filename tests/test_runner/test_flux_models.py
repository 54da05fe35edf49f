"""builtin:tiny-flux and FLUX model loading (CPU, offline): diffusers folder, single BFL
file, s3:// prefix, component overrides, and the hub path failing offline with the name."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline  # noqa: E402

from kubetune.errors import UserError  # noqa: E402
from runner.models.flux import FluxComponents  # noqa: E402
from runner.models.flux_keys import save_flux_single_file  # noqa: E402
from runner.models.loading import ModelSettings, load_model  # noqa: E402
from runner.models.tiny_flux import build_tiny_flux, t5_tokenizer  # noqa: E402


def _load(model: str, **kw: Any) -> FluxComponents:
    cache = kw.pop("cache_dir", None)
    comps = load_model(ModelSettings(model, family="flux", **kw), cache_dir=cache)
    assert isinstance(comps, FluxComponents)
    return comps


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_flux_generates_saves_and_reloads_offline(tiny_flux_dir: Path, tmp_path: Path) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)

    def image(p: FluxPipeline) -> np.ndarray:
        out = p("a photo of a cat", num_inference_steps=2, height=64, width=64,
                generator=torch.Generator().manual_seed(0), max_sequence_length=16)  # fmt: skip
        return np.asarray(out.images[0])

    first = image(pipe)
    assert first.shape == (64, 64, 3) and first.std() > 0
    pipe.save_pretrained(tmp_path / "again")
    assert np.array_equal(image(FluxPipeline.from_pretrained(tmp_path / "again")), first)


def test_tiny_flux_is_seeded(tiny_flux_dir: Path, tmp_path: Path) -> None:
    again = build_tiny_flux(tmp_path / "again", seed=0)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (tiny_flux_dir / name).read_bytes()


def test_t5_tokenizer_is_t5_shaped() -> None:
    tok = t5_tokenizer()
    ids = tok("a photo of a cat", padding="max_length", max_length=12).input_ids
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert ids[-1] == 0 and 1 in ids and ids.index(1) == len([i for i in ids if i]) - 1


def test_load_folder_gives_frozen_components(tiny_flux_dir: Path) -> None:
    comps = _load(str(tiny_flux_dir), weight_dtype="bfloat16")
    assert comps.transformer.dtype == torch.bfloat16
    assert comps.vae.config.latent_channels == 16
    assert type(comps.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    modules = (comps.transformer, comps.vae, *comps.text_encoders)
    assert not any(p.requires_grad for m in modules for p in m.parameters())
    assert comps.unet is comps.transformer


def test_single_bfl_file_loads_with_the_folder_as_config(
    tiny_flux_dir: Path, tmp_path: Path
) -> None:
    path = save_flux_single_file(tiny_flux_dir / "transformer", tmp_path / "flux1-tiny.safetensors")
    comps = _load(str(path), single_file_config=str(tiny_flux_dir))
    ref = _load(str(tiny_flux_dir))
    assert _same(comps.transformer, ref.transformer) and _same(comps.vae, ref.vae)


def test_a_file_that_is_not_flux_is_a_user_error(tiny_flux_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(UserError, match="other.safetensors"):
        _load(str(tmp_path / "other.safetensors"), single_file_config=str(tiny_flux_dir))


def test_component_overrides_replace_one_part(tiny_flux_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_flux(tmp_path / "seed1", seed=1)
    comps = _load(
        str(tiny_flux_dir),
        transformer_path=str(other / "transformer"),
        text_encoder_2_path=str(other),  # a pipeline folder: its text_encoder_2/
    )
    ref, alt = _load(str(tiny_flux_dir)), _load(str(other))
    assert _same(comps.transformer, alt.transformer) and _same(
        comps.text_encoder_2, alt.text_encoder_2
    )
    assert _same(comps.text_encoder, ref.text_encoder)


def test_builtin_tiny_flux(tmp_path: Path) -> None:
    comps = _load("builtin:tiny-flux", cache_dir=str(tmp_path))
    assert (tmp_path / "builtin" / "tiny-flux" / "model_index.json").exists()
    assert comps.transformer.config.guidance_embeds


def test_load_from_s3_prefix(
    tiny_flux_dir: Path, tmp_path: Path, s3_env: object, s3_bucket: str
) -> None:
    from kubetune.storage import open_store

    uri = f"s3://{s3_bucket}/models/tiny-flux"
    store = open_store(uri)
    for path in sorted(tiny_flux_dir.rglob("*")):
        if path.is_file():
            store.put_file(path.relative_to(tiny_flux_dir).as_posix(), path)
    comps = _load(uri, cache_dir=str(tmp_path / "cache"))
    ref = _load(str(tiny_flux_dir))
    assert _same(comps.transformer, ref.transformer)
    # a single BFL file on S3 whose components (and transformer config) are on S3 too
    single = save_flux_single_file(tiny_flux_dir / "transformer", tmp_path / "f.safetensors")
    open_store(f"s3://{s3_bucket}/files").put_file("flux1-tiny.safetensors", single)
    from_file = _load(
        f"s3://{s3_bucket}/files/flux1-tiny.safetensors",
        single_file_config=uri,
        cache_dir=str(tmp_path / "cache"),
    )
    assert _same(from_file.transformer, ref.transformer) and _same(from_file.vae, ref.vae)


def test_hub_name_offline_is_a_user_error_naming_the_model() -> None:
    with pytest.raises(UserError, match="kubetune-test/no-such-flux"):
        _load("kubetune-test/no-such-flux")


def test_transformer_path_may_be_a_single_bfl_file(tiny_flux_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_flux(tmp_path / "seed1", seed=1)
    path = save_flux_single_file(other / "transformer", tmp_path / "finetuned.safetensors")
    comps = _load(str(tiny_flux_dir), transformer_path=str(path))
    assert _same(comps.transformer, _load(str(other)).transformer)
