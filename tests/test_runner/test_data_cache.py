"""TensorCache: reuse, invalidation by content / model / transform, and the store mirror."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from kubetune.storage import open_store
from runner.data.cache import TensorCache, content_hash

NS = {"kind": "vae", "model": "tiny-sd@abc", "transform": {"center_crop": True}, "res": [32, 32]}


def cached(cache: TensorCache, content: bytes | str, compute: Callable[[], dict]) -> dict:
    """The tensors of ``content``, computed and stored on a miss (as the encoder caches do)."""
    key = cache.key(content)
    found = cache.get(key)
    if found is None:
        found = compute()
        cache.put(key, found)
    return found


def _counting(value: float):
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"latents": torch.full((4, 4, 4), value), "pooled": torch.arange(3.0)}

    return compute, calls


def test_reuse_across_instances(tmp_path: Path) -> None:
    compute, calls = _counting(1.5)
    first = cached(TensorCache(tmp_path, NS), b"image-bytes", compute)
    again = cached(TensorCache(tmp_path, NS), b"image-bytes", compute)
    assert len(calls) == 1
    assert torch.equal(first["latents"], again["latents"])
    assert torch.equal(again["pooled"], torch.arange(3.0))


def test_any_change_invalidates(tmp_path: Path) -> None:
    compute, calls = _counting(2.0)
    cached(TensorCache(tmp_path, NS), b"img", compute)
    cached(TensorCache(tmp_path, NS), b"img2", compute)  # content
    cached(TensorCache(tmp_path, {**NS, "model": "tiny-sd@def"}), b"img", compute)
    cached(TensorCache(tmp_path, {**NS, "transform": {"center_crop": False}}), b"img", compute)
    cached(TensorCache(tmp_path, {**NS, "res": [64, 64]}), b"img", compute)
    assert len(calls) == 5
    cached(TensorCache(tmp_path, dict(reversed(NS.items()))), b"img", compute)
    assert len(calls) == 5  # key order does not matter


def test_tensor_and_text_content_keys() -> None:
    a = torch.zeros(2, 3)
    assert content_hash(a) == content_hash(torch.zeros(2, 3))
    assert content_hash(a) != content_hash(torch.zeros(3, 2))
    assert content_hash(a) != content_hash(a.double())
    assert content_hash("a cat") != content_hash("a cat ")


def test_mirror_lets_a_restarted_pod_skip_recomputing(tmp_path: Path, store_uri: str) -> None:
    mirror = open_store(store_uri)
    compute, calls = _counting(3.0)
    cached(TensorCache(tmp_path / "pod-1", NS, mirror=mirror), "a prompt", compute)
    restarted = TensorCache(tmp_path / "pod-2", NS, mirror=mirror)  # empty local disk
    got = cached(restarted, "a prompt", compute)
    assert len(calls) == 1  # the restarted pod found it in the mirror
    assert torch.equal(got["latents"], torch.full((4, 4, 4), 3.0))
    assert any(p.suffix == ".safetensors" for p in (tmp_path / "pod-2").rglob("*"))


def test_run_cache_mirrors_next_to_the_run_on_s3(tmp_path: Path, s3_env, s3_bucket: str) -> None:
    from data_fixtures import lora_config

    from runner.models.loading import ModelSettings
    from runner.session.settings import cache_settings

    def open_run_cache(cfg, kind: str, model: str, local: Path):  # type: ignore[no-untyped-def]
        return cache_settings(cfg, ModelSettings(model), local / "work").open(kind)

    dataset = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "/data"}
    data = lora_config(dataset).model_dump(mode="json")
    data["storage"] = {"bucket": s3_bucket, "prefix": "runs", "endpoint_url": s3_env.endpoint}
    data["job"] = {"name": "demo"}
    cfg = type(lora_config(dataset)).model_validate(data)
    compute, calls = _counting(4.0)
    cached(open_run_cache(cfg, "vae", "m@1", tmp_path / "a"), b"x", compute)
    cached(open_run_cache(cfg, "vae", "m@1", tmp_path / "b"), b"x", compute)
    assert len(calls) == 1
    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert keys and all(k.startswith("runs/demo/cache/") for k in keys)
    flipped = lora_config(dataset, random_flip=True)
    assert (
        open_run_cache(flipped, "vae", "m@1", tmp_path / "a").namespace_id
        != open_run_cache(cfg, "vae", "m@1", tmp_path / "a").namespace_id
    )
