"""Load the frozen pieces training needs from a base model.

``model`` may be a Hugging Face hub name (``hf_variant`` picks e.g. fp16 weights), a local
diffusers directory, a local single-file ``.safetensors`` / ``.ckpt`` (diffusers' single-file
loading; pass ``single_file_config=<local diffusers dir>`` to work offline), or an
``s3://`` prefix holding a diffusers directory (downloaded once into a local cache).
Every returned module has ``requires_grad`` off; pipelines switch on what they train.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from kubetune.errors import UserError
from kubetune.humanize import count
from runner.models.embeddings import load_base_embeddings

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.config import StorageConfig

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
_HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
_TRANSFORMERS_DTYPE_KW = (
    "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
)


class ModelError(UserError):
    """The base model (or VAE / embeddings) cannot be found or loaded."""


@dataclass
class Components:
    """What training needs from a base model. ``*_2`` are set for SDXL only."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    is_sdxl: bool
    tokenizer_2: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    source: str = ""
    """Local path or hub name the components came from (for messages and validation)."""

    @property
    def tokenizers(self) -> list[CLIPTokenizer]:
        return [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return [t for t in (self.text_encoder, self.text_encoder_2) if t is not None]


def default_cache_dir() -> Path:
    """``$KUBETUNE_MODEL_CACHE`` or ``~/.cache/kubetune/models``."""
    env = os.environ.get("KUBETUNE_MODEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kubetune" / "models"


def to_dtype(weight_dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16`` (a ``torch.dtype`` passes through)."""
    if isinstance(weight_dtype, torch.dtype):
        return weight_dtype
    dtype = getattr(torch, str(weight_dtype), None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"unknown weight_dtype {weight_dtype!r}")
    return dtype


@dataclass(frozen=True)
class ModelSettings:
    """The base model fields of a pipeline config: what ``load_model`` reads."""

    model: str
    """Hub name, local diffusers dir, single file, ``s3://`` prefix or ``builtin:tiny-sd``."""
    hf_variant: str | None = None
    vae_model: str | None = None
    weight_dtype: str = "float32"
    prediction_type: str | None = None
    base_embeddings: Mapping[str, str] = field(default_factory=dict)
    """Token → TI embeddings file, loaded into the tokenizer(s) and text encoder(s)."""
    single_file_config: str | None = None
    storage: StorageConfig | None = None
    """For ``s3://`` model sources."""
    family: str = "sd"
    """``sd`` (SD 1.x / SDXL: ``load_model`` returns ``Components``) or ``flux``
    (``runner.models.flux.FluxComponents``)."""
    transformer_path: str | None = None
    """FLUX: a transformer folder replacing the model's."""
    text_encoder_1_path: str | None = None
    """FLUX: a CLIP text encoder folder replacing the model's."""
    text_encoder_2_path: str | None = None
    """FLUX: a T5 encoder folder replacing the model's."""

    def identity(self) -> str:
        """Everything about the model that changes the encoders' outputs (the encoder caches'
        key; the JSON format is what stored caches were keyed by)."""
        fields: tuple[str, ...] = (
            "model",
            "hf_variant",
            "vae_model",
            "weight_dtype",
            "base_embeddings",
        )
        if self.family != "sd":  # SD keys stay as they were: stored caches remain valid
            fields += ("family", "transformer_path", "text_encoder_1_path", "text_encoder_2_path")
        return json.dumps({f: getattr(self, f) for f in fields}, sort_keys=True, default=str)


def load_model(s: ModelSettings, *, cache_dir: str | Path | None = None) -> Components:
    """Load tokenizer(s), text encoder(s), VAE, UNet and a DDPM noise scheduler.

    ``cache_dir`` holds ``s3://`` downloads and built-in models (default:
    ``default_cache_dir()``). Raises ``ModelError`` (a ``UserError``) naming the path when
    something is missing.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    if s.family == "flux":
        from runner.models.flux import load_flux

        return load_flux(s, cache)  # type: ignore[return-value]
    dtype = to_dtype(s.weight_dtype)
    source = _resolve(s.model, s.storage, cache)
    if _is_single_file(source):
        comps = _load_single_file(source, s.single_file_config, dtype)
    else:
        comps = _load_pretrained(source, s.hf_variant, dtype)
    if s.vae_model:
        comps.vae = load_vae(
            s.vae_model,
            dtype,
            storage=s.storage,
            cache_dir=cache,
            single_file_config=s.single_file_config,
        )
    if s.prediction_type:
        comps.noise_scheduler = DDPMScheduler.from_config(
            comps.noise_scheduler.config, prediction_type=s.prediction_type
        )
    for module in (comps.unet, comps.vae, *comps.text_encoders):
        module.requires_grad_(False)
    if s.base_embeddings:
        files = {
            token: str(_resolve(path, s.storage, cache, is_file=True))
            for token, path in s.base_embeddings.items()
        }
        load_base_embeddings(comps, files)
    return comps


# --- resolving a model string to something loadable ---------------------------------------


BUILTIN_MODELS = ("tiny-sd", "tiny-sdxl", "tiny-flux")


def builtin_model(name: str, cache: Path) -> Path:
    """Build (once) and return kubetune's tiny offline model ``builtin:tiny-sd|tiny-sdxl|
    tiny-flux``."""
    from runner.models.tiny import build_tiny_sd, build_tiny_sdxl
    from runner.models.tiny_flux import build_tiny_flux

    if name not in BUILTIN_MODELS:
        raise ModelError(
            f"builtin:{name}: unknown built-in model; use one of "
            + ", ".join(f"builtin:{m}" for m in BUILTIN_MODELS)
        )
    build = {"tiny-sd": build_tiny_sd, "tiny-sdxl": build_tiny_sdxl, "tiny-flux": build_tiny_flux}
    target = cache / "builtin" / name
    if not (target / "model_index.json").exists():
        tmp = target.with_name(f"{name}.partial-{os.getpid()}-{threading.get_ident()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build[name](tmp)
        _install(tmp, target)
    return target


def _install(built: Path, target: Path) -> None:
    """Move a model built in ``built`` to ``target`` in one rename, unless another process got
    there first (the ranks of a torchrun on an empty cache all build it): then its copy
    stays, it may be being read already, and ours goes."""
    try:
        os.rename(built, target)  # fails if target is a folder with files in it
        return
    except OSError:
        if (target / "model_index.json").exists():
            shutil.rmtree(built, ignore_errors=True)
            return
    shutil.rmtree(target, ignore_errors=True)  # a leftover without model_index.json
    os.rename(built, target)


def _resolve(uri: str, storage: Any, cache: Path, *, is_file: bool = False) -> str:
    """Local path or hub name for ``uri``; ``s3://`` / ``gs://`` / ``az://`` sources are downloaded
    to ``cache``."""
    if uri.startswith("builtin:"):
        return str(builtin_model(uri.removeprefix("builtin:"), cache))
    from kubetune.storage import is_remote, open_store, split_uri

    if is_remote(uri):
        if is_file or uri.endswith(SINGLE_FILE_SUFFIXES):
            parent, name = split_uri(uri.rstrip("/"))
            return str(download_prefix(open_store(parent, storage), cache, only=name) / name)
        return str(download_prefix(open_store(uri, storage), cache))
    path = Path(uri).expanduser()
    if path.exists():
        return str(path)
    if is_file or not _HUB_NAME.match(uri) or uri.endswith(SINGLE_FILE_SUFFIXES):
        raise ModelError(f"{uri}: no such file or directory")
    return uri  # a hub name


def download_prefix(store: Any, cache_root: str | Path, *, only: str | None = None) -> Path:
    """Copy every object under ``store`` (or just the key ``only``) into ``cache_root`` once.

    The copy lands in ``cache_root/<name>-<hash of uri>/``; a ``.complete`` marker written
    last makes later calls reuse it (an interrupted download is redone from scratch).
    """
    cache_root = Path(cache_root)
    uri = store.uri.rstrip("/")
    slug = re.sub(r"[^\w.-]", "_", uri.rsplit("/", 1)[-1]) or "model"
    digest = hashlib.sha256(f"{uri}|{only or ''}".encode()).hexdigest()[:12]
    dest, marker = cache_root / f"{slug}-{digest}", cache_root / f"{slug}-{digest}.complete"
    if marker.exists() and dest.is_dir():
        return dest
    objects = [o for o in store.list("") if only is None or o.key == only]
    if not objects:
        raise ModelError(f"{store.url(only or '')}: no files there")
    partial = cache_root / f".{slug}-{digest}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for obj in objects:
        target = partial / obj.key
        target.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(obj.key, target)
        if target.stat().st_size != obj.size:
            raise ModelError(f"{store.url(obj.key)}: downloaded size differs from the listing")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    marker.write_text(f"{uri}\n{count(len(objects), 'file')}\n")
    log.info("downloaded %s from %s to %s", count(len(objects), "file"), uri, dest)
    return dest


def _is_single_file(source: str) -> bool:
    return Path(source).is_file()


# --- diffusers directories / hub repos -----------------------------------------------------


def _load_pretrained(source: str, variant: str | None, dtype: torch.dtype) -> Components:
    index = _model_index(source)
    is_sdxl = "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index

    def load(cls: Any, sub: str) -> Any:
        return _from_pretrained(cls, source, sub, variant=variant, dtype=dtype)

    comps = Components(
        tokenizer=_tokenizer(source, "tokenizer"),
        text_encoder=load(CLIPTextModel, "text_encoder"),
        vae=load(AutoencoderKL, "vae"),
        unet=load(UNet2DConditionModel, "unet"),
        noise_scheduler=_guard(
            source,
            "scheduler",
            lambda: DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
        ),
        is_sdxl=is_sdxl,
        source=source,
    )
    if is_sdxl:
        comps.tokenizer_2 = _tokenizer(source, "tokenizer_2")
        comps.text_encoder_2 = load(CLIPTextModelWithProjection, "text_encoder_2")
    return comps


def _model_index(source: str) -> dict[str, Any]:
    if Path(source).is_dir() and not (Path(source) / "model_index.json").exists():
        raise ModelError(
            f"{source}: not a diffusers model directory (no model_index.json)",
            hint="point `model` at a diffusers pipeline directory or a single checkpoint file",
        )
    return _guard(source, "model_index.json", lambda: StableDiffusionPipeline.load_config(source))


def _guard(source: str, what: str, fn: Any) -> Any:
    """Run ``fn``; translate loading errors into ``ModelError`` naming ``source``."""
    try:
        return fn()
    except (OSError, ValueError, KeyError) as err:
        if _hub_unreachable(err):
            raise ModelError(
                f"{source}: cannot download {what}: the Hugging Face Hub cannot be reached "
                "(offline, or no network) and it is not in the local cache",
                hint="check the network (HF_HUB_OFFLINE, HF_ENDPOINT), download it beforehand, "
                "or point `model` (or `vae_model`) at a local diffusers folder or an s3:// prefix",
            ) from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"{source}: cannot load {what}: {first}") from err


def _hub_unreachable(err: BaseException | None) -> bool:
    """Whether a loading error comes from the Hub being unreachable with nothing cached
    (huggingface_hub's LocalEntryNotFoundError somewhere in its chain)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen = 0
    while err is not None and seen < 20:  # bounded: chains can be long, never cyclic here
        if isinstance(err, LocalEntryNotFoundError):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False


def _tokenizer(source: str, sub: str) -> CLIPTokenizer:
    return _guard(source, sub, lambda: CLIPTokenizer.from_pretrained(source, subfolder=sub))


def _has_variant(source: str, sub: str, variant: str) -> bool | None:
    """Whether a local directory has ``variant`` weights (None: cannot tell, e.g. hub)."""
    folder = Path(source) / sub
    if not folder.is_dir():
        return None
    return any(f".{variant}." in p.name for p in folder.iterdir())


def _from_pretrained(
    cls: Any, source: str, sub: str, *, variant: str | None, dtype: torch.dtype
) -> Any:
    is_transformers = issubclass(cls, transformers.PreTrainedModel)
    kwargs = {
        "subfolder": sub,
        (_TRANSFORMERS_DTYPE_KW if is_transformers else "torch_dtype"): dtype,
    }
    has_variant = _has_variant(source, sub, variant) if variant else None
    if variant and has_variant is not False:
        try:
            return cls.from_pretrained(source, variant=variant, **kwargs)
        except (OSError, ValueError) as err:
            log.debug("variant %s of %s/%s failed: %s", variant, source, sub, err)
    if variant:  # worth a warning for a hub model only: a local folder has what it has
        warn = log.warning if has_variant is None else log.debug
        warn("%s/%s has no %r variant weights; loading its default weights instead",
             source, sub, variant)  # fmt: skip
    return _guard(source, sub, lambda: cls.from_pretrained(source, **kwargs))


def load_vae(
    vae_model: str,
    weight_dtype: str | torch.dtype = "float32",
    *,
    storage: Any = None,
    cache_dir: str | Path | None = None,
    single_file_config: str | None = None,
) -> AutoencoderKL:
    """An ``AutoencoderKL`` from a VAE dir/repo, a pipeline dir/repo (``vae/``), or a file."""
    dtype = to_dtype(weight_dtype)
    source = _resolve(vae_model, storage, Path(cache_dir) if cache_dir else default_cache_dir())
    if _is_single_file(source):
        config = {"config": single_file_config, "subfolder": "vae"} if single_file_config else {}
        return _guard(
            source,
            "vae",
            lambda: AutoencoderKL.from_single_file(source, torch_dtype=dtype, **config),
        )
    local = Path(source)
    sub = "vae" if local.is_dir() and not (local / "config.json").exists() else ""
    try:
        return AutoencoderKL.from_pretrained(source, subfolder=sub or None, torch_dtype=dtype)
    except (OSError, ValueError) as err:
        if local.is_dir() or sub:
            raise ModelError(f"{source}: cannot load the VAE: {err}") from err
    return _guard(
        source,
        "vae",
        lambda: AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype),
    )


# --- single files --------------------------------------------------------------------------


def _single_file_is_sdxl(path: str) -> bool:
    marker = "conditioner.embedders.1."
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with _guard_ctx(path), safe_open(path, "pt") as f:
            return any(k.startswith(marker) for k in f.keys())  # noqa: SIM118
    with _guard_ctx(path):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    state = state.get("state_dict", state)
    return any(k.startswith(marker) for k in state)


@contextlib.contextmanager
def _guard_ctx(path: str) -> Iterator[None]:
    """Translate errors while reading a checkpoint's header into ``ModelError``."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as err:
        raise ModelError(f"{path}: not a readable checkpoint: {err}") from err


def _load_single_file(path: str, config: str | None, dtype: torch.dtype) -> Components:
    is_sdxl = _single_file_is_sdxl(path)
    cls = StableDiffusionXLPipeline if is_sdxl else StableDiffusionPipeline
    extra: dict[str, Any] = {} if is_sdxl else {"safety_checker": None}
    if config:
        extra["config"] = config
    try:
        pipe = cls.from_single_file(path, torch_dtype=dtype, **extra)
    except Exception as err:  # diffusers raises many kinds here (hub, conversion, config)
        hint = (
            None
            if config
            else (
                "single-file loading fetches the model configs from the hub; offline, give a "
                "local diffusers directory of the same architecture as the single-file config"
            )
        )
        raise ModelError(f"{path}: cannot load single-file checkpoint: {err}", hint=hint) from err
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        is_sdxl=is_sdxl,
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        source=path,
    )
