"""`cache_vae_outputs` / `cache_text_encoder_outputs` persisted with the run: VAE latent
moments and text embeddings in `runner.data.cache.TensorCache` files under `<run>/cache/`
(a local run) or a local work folder mirrored to `s3://…/<run>/cache/` (a Kubernetes run),
so a restarted pod neither re-reads the images nor re-encodes them.

An entry is keyed by the model identity, the data-loader settings that change pixels or
captions (the cache namespace), and the example: its key, byte size and version from the
dataset index for latents, the final caption text for embeddings. Hugging Face rows are
versioned by the Arrow dataset's fingerprint; examples without any version are encoded every
start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kubetune.humanize import count
from kubetune.storage import open_store
from runner.data.cache import TensorCache
from runner.data.loader import ResumableLoader, cache_batches

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.config import StorageConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheSettings:
    """Where the run's encoder caches live and what keys them."""

    local_root: Path
    """Local folder of the caches (the run folder for a local run, else a work folder)."""
    namespaces: dict[str, dict[str, Any]]
    """``"vae"`` / ``"text"`` → the cache namespace (model identity + data-loader settings)."""
    mirror_uri: str | None = None
    """``<run output>/cache`` when the run's storage is S3, so a restarted pod reuses it."""
    storage: StorageConfig | None = None

    def open(self, kind: str) -> TensorCache:
        """The ``kind`` cache on local disk, mirrored to ``mirror_uri`` if set."""
        mirror = open_store(self.mirror_uri, self.storage) if self.mirror_uri else None
        return TensorCache(self.local_root, self.namespaces[kind], mirror)


class PersistedCaches:
    """Loads what a previous start encoded into the pipeline's in-memory caches, and stores
    what this start encodes (main process only)."""

    def __init__(self, settings: CacheSettings, pipeline: Any, *, is_main: bool) -> None:
        self.pipeline, self.is_main = pipeline, is_main
        self.vae = settings.open("vae") if pipeline.latents.cache is not None else None
        self.text = settings.open("text") if pipeline.text.cache is not None else None
        self._loaded_latents: set[str] = set()
        self._loaded_captions: set[str] = set()

    def warm(self, loader: ResumableLoader) -> None:
        """Fill the pipeline's caches: from storage where possible, by encoding otherwise."""
        done = self._restore(loader)
        todo = len(loader.dataset) - len(done)
        log.info("encoder caches: %s restored, %d to encode", count(len(done), "example"), todo)
        self.pipeline.warm_caches(cache_batches(loader, skip=done))
        if self.is_main:
            self._store(loader)

    def _restore(self, loader: ResumableLoader) -> set[int]:
        """Indices whose latents and embeddings were both found."""
        done = set()
        source = loader.dataset.source
        for index, rec in enumerate(source.records):
            if not rec.etag:
                continue
            ok = True
            if self.vae is not None:
                ok = self._restore_latents(rec.id, _version(source, index))
            if self.text is not None:
                ok = self._restore_text(loader.dataset.caption(index, 0)) and ok
            if ok:
                done.add(index)
        return done

    def _restore_latents(self, example: str, version: str) -> bool:
        assert self.vae is not None
        found = self.vae.get(self.vae.key(version))
        latents = self.pipeline.latents
        if found is None or (latents.flips and "mean_flipped" not in found):
            return False
        latents.cache[(example, False)] = (found["mean"], found["std"])
        if latents.flips:
            latents.cache[(example, True)] = (found["mean_flipped"], found["std_flipped"])
        self._loaded_latents.add(example)
        return True

    def _restore_text(self, caption: str) -> bool:
        assert self.text is not None
        if caption in self._loaded_captions:
            return True
        found = self.text.get(self.text.key(caption))
        if found is None:
            return False
        self.pipeline.text.cache[caption] = (found["hidden"], found.get("pooled"))
        self._loaded_captions.add(caption)
        return True

    def _store(self, loader: ResumableLoader) -> None:
        """Put every entry this start encoded."""
        source = loader.dataset.source
        if self.vae is not None:
            for index, rec in enumerate(source.records):
                tensors = self._latent_tensors(rec.id)
                if rec.etag and tensors is not None and rec.id not in self._loaded_latents:
                    self.vae.put(self.vae.key(_version(source, index)), tensors)
        if self.text is not None:
            for caption, (hidden, pooled) in self.pipeline.text.cache.items():
                if caption in self._loaded_captions:
                    continue
                tensors = {"hidden": hidden} | ({} if pooled is None else {"pooled": pooled})
                self.text.put(self.text.key(caption), tensors)  # type: ignore[arg-type]

    def _latent_tensors(self, example: str) -> dict[str, torch.Tensor] | None:
        """What the disk cache holds for an example: both orientations with flips."""
        latents = self.pipeline.latents
        names = {False: ("mean", "std"), True: ("mean_flipped", "std_flipped")}
        out: dict[str, torch.Tensor] = {}
        for flipped in (False, True) if latents.flips else (False,):
            if (example, flipped) not in latents.cache:
                return None
            mean, std = latents.cache.stored((example, flipped))
            out |= dict(zip(names[flipped], (mean, std), strict=True))
        return out


def _version(source: Any, index: int) -> str:
    """An example's identity for the latent cache: where it is, its size and version."""
    rec = source.records[index]
    return f"{source.store_uri(index)}|{rec.image_key or rec.id}|{rec.size}|{rec.etag}"
