"""cache_vae_outputs / cache_text_encoder_outputs persisted with the run: a restarted run
encodes nothing again and trains the same weights; a changed image is re-encoded alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from s3server import S3Server
from train_support import checkpoint_weights, make_config, train, write_dataset

from runner.pipelines.base import LatentEncoder, TextConditioner

pytestmark = pytest.mark.timeout(900)  # three short trainings; slow only on a loaded machine


@pytest.fixture
def encodes(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts examples the real VAE and text encoders encode."""
    counter: Counter[str] = Counter()
    moments, encode = LatentEncoder._moments, TextConditioner._encode

    def counted_moments(self, pixels, device):  # type: ignore[no-untyped-def]
        counter["vae"] += pixels.shape[0]
        return moments(self, pixels, device)

    def counted_encode(self, captions, device):  # type: ignore[no-untyped-def]
        counter["text"] += len(captions)
        return encode(self, captions, device)

    monkeypatch.setattr(LatentEncoder, "_moments", counted_moments)
    monkeypatch.setattr(TextConditioner, "_encode", counted_encode)
    return counter


@pytest.mark.slow
def test_restart_reuses_the_stored_encodings(
    tiny_sd_dir: Path, tmp_path: Path, encodes: Counter[str]
) -> None:
    data = write_dataset(tmp_path / "images", n=4)
    out = tmp_path / "out"
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data,
        out,
        max_train_steps=2,
        save_every_n_steps=2,
        train_text_encoder=False,
        cache_vae_outputs=True,
        cache_text_encoder_outputs=True,
    )
    train(cfg)
    assert encodes == {"vae": 4, "text": 4}
    first = checkpoint_weights(out, 2)
    assert len(list((out / "cache").rglob("*.safetensors"))) == 8  # 4 latents + 4 captions

    encodes.clear()
    train(cfg, force_restart=True)  # a new start of the same run: everything from storage
    assert encodes == {}
    for key, value in checkpoint_weights(out, 2).items():
        torch.testing.assert_close(value, first[key], rtol=0, atol=0)

    (data / "img-2.png").write_bytes((data / "img-0.png").read_bytes())  # a changed image
    encodes.clear()
    train(cfg, force_restart=True)
    assert encodes == {"vae": 1}


def test_a_restarted_pod_reuses_the_encodings_stored_on_s3(
    tiny_sd_dir: Path,
    tmp_path: Path,
    encodes: Counter[str],
    s3_env: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Kubernetes run (outputs on S3): each start works in a fresh local folder that is
    gone afterwards, as a new pod's is; the second start encodes nothing, it reads the
    encodings from `s3://…/<run>/cache/`."""
    monkeypatch.delenv("KUBETUNE_WORK_DIR", raising=False)  # a fresh temporary folder each
    data = write_dataset(tmp_path / "images", n=4)
    cfg = make_config(
        "SD_LORA",
        tiny_sd_dir,
        data,
        tmp_path / "unused",
        max_train_steps=2,
        save_every_n_steps=2,
        train_text_encoder=False,
        cache_vae_outputs=True,
        cache_text_encoder_outputs=True,
        storage={"bucket": s3_bucket, "prefix": "runs", "endpoint_url": s3_env.endpoint},
        job={"name": "cached"},
    )
    train(cfg)
    assert encodes == {"vae": 4, "text": 4}
    listed = s3_env.client().list_objects_v2(Bucket=s3_bucket, Prefix="runs/cached/cache/")
    assert sum(k["Key"].endswith(".safetensors") for k in listed["Contents"]) == 8

    encodes.clear()
    train(cfg, force_restart=True)  # a new pod: nothing on its local disk
    assert encodes == {}
