"""Load the frozen pieces FLUX_LORA trains with: CLIP and T5 tokenizers and text encoders, the
16-channel VAE, the ``FluxTransformer2DModel`` and the flow-matching scheduler.

``model`` is a hub name (``black-forest-labs/FLUX.1-dev``), a local diffusers folder, an
``s3://`` prefix holding one, ``builtin:tiny-flux``, or a single FLUX.1 transformer
``.safetensors`` file in BFL layout (``flux1-dev.safetensors``; its text encoders, VAE and
scheduler then come from ``single_file_config``, default FLUX.1-dev). ``transformer_path``
(a folder, hub name, ``s3://`` prefix or a single BFL-layout file), ``text_encoder_1_path`` and
``text_encoder_2_path`` (folders) replace one component each. Every module comes back with
``requires_grad`` off.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from runner.models import loading
from runner.models.loading import ModelError, _from_pretrained, _guard, to_dtype

if TYPE_CHECKING:  # pragma: no cover
    from runner.models.loading import ModelSettings

FLUX_DEV = "black-forest-labs/FLUX.1-dev"


@dataclass
class FluxComponents:
    """What FLUX_LORA trains with. ``unet`` names the transformer for the code every type
    shares (placing on the device, gradient checkpointing, train mode)."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    tokenizer_2: T5TokenizerFast
    text_encoder_2: T5EncoderModel
    vae: AutoencoderKL
    transformer: FluxTransformer2DModel
    noise_scheduler: FlowMatchEulerDiscreteScheduler
    source: str = ""
    is_sdxl: ClassVar[bool] = False
    is_flux: ClassVar[bool] = True

    @property
    def unet(self) -> FluxTransformer2DModel:
        return self.transformer

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer, self.tokenizer_2]

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [self.text_encoder, self.text_encoder_2]


def load_flux(s: ModelSettings, cache: Path) -> FluxComponents:
    """Every FLUX component from ``s`` (see the module docstring); ``cache`` holds ``s3://``
    downloads and built-in models."""
    dtype = to_dtype(s.weight_dtype)
    source = loading._resolve(s.model, s.storage, cache)
    transformer = None
    if Path(source).is_file():  # the rest (and the transformer's config) from elsewhere
        file, source = source, loading._resolve(s.single_file_config or FLUX_DEV, s.storage, cache)
        transformer = load_single_file_transformer(file, source, dtype)

    def part(cls: Any, sub: str, override: str | None) -> Any:
        if override is None:
            return _from_pretrained(cls, source, sub, variant=s.hf_variant, dtype=dtype)
        where = loading._resolve(override, s.storage, cache)
        if Path(where).is_file() and cls is FluxTransformer2DModel:  # a BFL-layout file
            return load_single_file_transformer(where, source, dtype)  # config: the model's
        inner = sub if (Path(where) / sub).is_dir() else ""
        return _from_pretrained(cls, where, inner, variant=s.hf_variant, dtype=dtype)

    comps = FluxComponents(
        tokenizer=_tokenizer(CLIPTokenizer, source, "tokenizer"),
        text_encoder=part(CLIPTextModel, "text_encoder", s.text_encoder_1_path),
        tokenizer_2=_tokenizer(T5TokenizerFast, source, "tokenizer_2"),
        text_encoder_2=part(T5EncoderModel, "text_encoder_2", s.text_encoder_2_path),
        vae=part(AutoencoderKL, "vae", None),
        transformer=transformer or part(FluxTransformer2DModel, "transformer", s.transformer_path),
        noise_scheduler=_guard(
            source,
            "scheduler",
            lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
        ),
        source=str(s.model),
    )
    for module in (comps.transformer, comps.vae, *comps.text_encoders):
        module.requires_grad_(False)
        module.eval()
    return comps


def _tokenizer(cls: Any, source: str, sub: str) -> Any:
    return _guard(source, sub, lambda: cls.from_pretrained(source, subfolder=sub))


def load_single_file_transformer(
    path: str, config: str | None, dtype: torch.dtype
) -> FluxTransformer2DModel:
    """A BFL-layout FLUX transformer file (as released, or under ``model.diffusion_model.``)
    converted with ``runner.models.flux_keys`` into a model built from the ``transformer``
    config of ``config`` (default FLUX.1-dev), without a second copy of the weights.

    diffusers' ``FluxTransformer2DModel.from_single_file`` does the same conversion but splits
    the fused single-block weights at FLUX.1's fixed 3072 / 12288 sizes; kubetune reads the
    sizes from the tensors, so the same code loads FLUX.1 and smaller models."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file

    from runner.models.flux_keys import bfl_to_diffusers

    where = config or FLUX_DEV
    settings = _guard(
        where,
        "transformer config",
        lambda: FluxTransformer2DModel.load_config(where, subfolder="transformer"),
    )
    try:
        state = bfl_to_diffusers(load_file(path))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise ModelError(f"{path}: not a FLUX.1 transformer file in BFL layout: {err}") from err
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(settings)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise ModelError(
            f"{path}: does not fit the transformer config of {where}: {first}",
            hint="set single_file_config to a diffusers FLUX folder of the same size",
        ) from err
    return model.to(dtype)
