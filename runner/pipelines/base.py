"""What every training type shares: text conditioning, the noise-prediction loss of one
micro-batch, and the contract the loop and checkpointer rely on (``TrainingPipeline``)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune.config import PipelineConfig
from kubetune.config.extensions import DEFAULT_HUBER_C
from runner.checkpoint.safetensors_stream import copy_into, write_safetensors
from runner.models.embeddings import expand_placeholders, multi_vector_tokens
from runner.models.loading import Components
from runner.training.ema import EmaWeights
from runner.training.losses import diffusion_loss, training_target
from runner.training.memory_cache import BoundedCache, DeviceBudget
from runner.training.noise import (
    DropoutRows,
    NoiseSettings,
    Rows,
    whole,
    zero_terminal_snr_scheduler,
)
from runner.training.optim import ParamGroups
from runner.training.precision import autocast_off
from runner.training.speed import to_device

Batch = dict[str, Any]
TOKEN_CACHE_SIZE = 1 << 16
"""Captions whose token ids are kept per tokenizer (then the cache starts over)."""
OFFLOAD_DEVICE = torch.device("cpu")
"""Where encoders whose outputs are cached wait during training steps."""


class TextConditioner:
    """Turns captions into UNet conditioning (SD: hidden states; SDXL: both encoders'
    penultimate hidden states concatenated, plus the pooled projection of encoder 2).

    Multi-vector tokens (the trained placeholder and ``base_embeddings`` tokens) are expanded
    to all their vectors ("tok tok_1 tok_2") in every caption just before tokenizing, as
    invoke-training does (and diffusers' ``maybe_convert_prompt`` at inference).
    """

    def __init__(self, comps: Components, cache: BoundedCache[str] | None = None) -> None:
        self.comps = comps
        self._token_ids: dict[int, dict[str, torch.Tensor]] = {}
        """Per tokenizer (by id): caption → its token ids (host memory)."""
        self.cache = cache
        """Embeddings per caption (``cache_text_encoder_outputs``), or None."""

    def _ids(self, tokenizer: Any, captions: list[str], device: torch.device) -> torch.Tensor:
        """Token ids [B, 77] on ``device``; each caption is tokenized once per tokenizer
        (a tokenizer call costs milliseconds of host time per step)."""
        known = self._token_ids.setdefault(id(tokenizer), {})
        missing = [c for c in dict.fromkeys(captions) if c not in known]
        if missing:
            if len(known) + len(missing) > TOKEN_CACHE_SIZE:
                known.clear()
            expansions = multi_vector_tokens(tokenizer)
            ids = tokenizer(
                [expand_placeholders(c, expansions) for c in missing],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            known.update(zip(missing, ids, strict=True))
        return to_device(torch.stack([known[c] for c in captions]), device)

    def encode(
        self, captions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states [B, 77, D], pooled [B, P] or None), cached per caption if asked."""
        if self.cache is None:
            return self._encode(captions, device)
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            hidden, pooled = self._encode(missing, device)
            for i, caption in enumerate(missing):
                self.cache[caption] = (
                    hidden[i].detach(),
                    None if pooled is None else pooled[i].detach(),
                )
        rows = [self.cache[c] for c in captions]
        pooled_rows = [p for _, p in rows]
        return (
            torch.stack([h for h, _ in rows]),
            None if pooled_rows[0] is None else torch.stack(pooled_rows),
        )  # type: ignore

    def _encode(
        self, captions: list[str], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode on ``device`` (offloaded encoders come back for it: a cache miss)."""
        comps = self.comps
        with on_device(comps.text_encoders, device):
            ids = self._ids(comps.tokenizer, captions, device)
            if not comps.is_sdxl:
                return comps.text_encoder(ids)[0], None
            out1 = comps.text_encoder(ids, output_hidden_states=True)
            out2 = comps.text_encoder_2(
                self._ids(comps.tokenizer_2, captions, device), output_hidden_states=True
            )
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return hidden, out2.text_embeds


class LatentEncoder:
    """VAE encoding to the latent distribution (mean, std), optionally cached per (example id,
    flipped); sampling uses the training generator so cached and uncached runs match.

    With ``random_flip`` the cache holds both orientations of each example (kohya caches the
    flipped latents too): a batch's ``"flipped"`` picks the one its transform drew."""

    def __init__(
        self,
        vae: nn.Module,
        cache: BoundedCache[tuple[str, bool]] | None = None,
        *,
        flips: bool = False,
    ) -> None:
        self.vae, self.cache, self.flips = vae, cache, flips

    @torch.no_grad()
    def _moments(
        self, pixels: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode on ``device`` (an offloaded VAE comes back for it: a cache miss)."""
        with on_device([self.vae], device):
            pixels = to_device(pixels, device).to(dtype_of(self.vae))
            with autocast_off(device):  # the VAE computes in its own dtype
                dist = self.vae.encode(pixels).latent_dist
            return dist.mean, dist.std

    def fill(self, batch: Batch, device: torch.device) -> None:
        """Cache the moments of the batch's examples not cached yet (both orientations when
        flips are on: the mirror image encoded in the same VAE batch)."""
        assert self.cache is not None
        keys = _latent_keys(batch)
        todo = [i for i, key in enumerate(keys) if key not in self.cache]
        if not todo:
            return
        pixels = batch["pixel_values"]
        pixels = pixels if len(todo) == len(keys) else pixels[todo]
        wanted = [keys[i] for i in todo]
        if self.flips:
            pixels = torch.cat([pixels, pixels.flip(-1)])
            wanted += [(example, not flipped) for example, flipped in wanted]
        mean, std = self._moments(pixels, device)
        for j, key in enumerate(wanted):
            self.cache[key] = (mean[j], std[j])

    def sample(
        self,
        batch: Batch,
        device: torch.device,
        generator: torch.Generator,
        rows: Rows | None = None,
    ) -> torch.Tensor:
        if self.cache is None:
            mean, std = self._moments(batch["pixel_values"], device)
        else:
            self.fill(batch, device)
            cached = [self.cache[key] for key in _latent_keys(batch)]
            mean = torch.stack([m for m, _ in cached])  # type: ignore[misc]
            std = torch.stack([s for _, s in cached])  # type: ignore[misc]
        noise = (rows or whole(mean)).randn(tuple(mean.shape[1:]), generator, mean.dtype)
        latents = mean + std * noise.to(device)
        return latents * self.vae.config.scaling_factor


def _latent_keys(batch: Batch) -> list[tuple[str, bool]]:
    """(example id, flipped) of each example (a batch without ``"flipped"``: none flipped)."""
    flipped = batch.get("flipped") or [False] * len(batch["id"])
    return [(str(example), bool(flip)) for example, flip in zip(batch["id"], flipped, strict=True)]


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """The modules on ``device`` for the block; those that were elsewhere (offloaded) go back
    after it."""
    away = [(m, _device_of(m)) for m in modules if not same_device(_device_of(m), device)]
    for module, _ in away:
        module.to(device)
    try:
        yield
    finally:
        for module, where in away:
            module.to(where)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` are one device (an index left out means the current one)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of the module's first parameter (its frozen weights' dtype): what diffusers'
    ``ModelMixin.dtype`` returns, without walking every submodule on each call (~1 ms for a
    UNet, several times per step)."""
    return next(module.parameters()).dtype


def sdxl_time_ids(batch: Batch, height: int, width: int, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (6 per sample)."""
    n = len(batch["caption"])
    target = torch.tensor([[height, width]] * n, dtype=torch.long)
    ids = torch.cat(
        [batch["original_size_hw"].long(), batch["crop_top_left_yx"].long(), target], dim=1
    )
    return to_device(ids, device)


class TrainingPipeline:
    """Base class of the per-type pipelines.

    Subclasses add trainable parameters in ``__init__`` and implement ``param_groups``,
    ``trainable_parameters`` and ``export``. The loop calls ``loss`` per micro-batch,
    ``after_optimizer_step`` after each step and ``set_train(False/True)`` around validation.
    After ``warm_caches`` the encoders it replaced wait on ``OFFLOAD_DEVICE`` while training
    and come back for validation (``set_train(False)``).
    """

    def __init__(
        self,
        cfg: PipelineConfig,
        comps: Components,
        device: torch.device,
        *,
        cache_text: bool = False,
    ) -> None:
        self.cfg = cfg
        self.comps = comps
        self.device = device
        self.cache_budget = DeviceBudget(int(cfg.encoder_cache_device_mb * 2**20))
        """Device memory the encoder caches share (``encoder_cache_device_mb``)."""
        self.text = TextConditioner(comps, self.new_cache() if cache_text else None)
        self.latents = LatentEncoder(
            comps.vae,
            self.new_cache() if cfg.cache_vae_outputs else None,
            flips=cfg.data_loader.random_flip,  # type: ignore[attr-defined]
        )
        if cfg.zero_terminal_snr:
            comps.noise_scheduler = zero_terminal_snr_scheduler(comps.noise_scheduler)
        self.noise = NoiseSettings.from_config(cfg)
        self.ema: EmaWeights | None = None
        """Set by ``build_pipeline`` when ``ema_decay`` is; see ``averaged``."""
        # a flow-matching scheduler (FLUX) has no prediction type
        self.prediction_type: str = comps.noise_scheduler.config.get("prediction_type", "flow")
        self.train_text_encoders = False  # subclasses set True when gradients flow through
        self.lora_dropout = 0.0  # LoRA subclasses set their config's
        self._micro_batch = (0, 0)
        """(step, micro-batch index) of the next ``loss``: the dropout seed's host inputs."""
        self.compiled_unet: nn.Module | None = None
        """The UNet as training steps call it with ``compile_unet`` (validation: eager)."""
        self.offloaded: list[nn.Module] = []
        """Encoders kept off the device during training steps (see ``warm_caches``)."""

    def new_cache(self) -> BoundedCache[Any]:
        """An encoder-output cache on the training device, within ``cache_budget``."""
        return BoundedCache(self.device, self.cache_budget)

    # --- contract -------------------------------------------------------------------------
    def param_groups(self) -> ParamGroups:
        raise NotImplementedError

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Every parameter training may change, by a stable name (checkpoint keys)."""
        raise NotImplementedError

    def export(self, out_dir: Path) -> list[Path]:
        """Write the user-facing outputs (LoRA / embeddings files) into ``out_dir``."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Hook before each optimizer step (``step`` counts completed steps; subclasses call
        super)."""
        self._micro_batch = (step, 0)

    def after_optimizer_step(self) -> None:
        """Hook right after ``optimizer.step()`` (updates the EMA; subclasses call super)."""
        if self.ema is not None:
            self.ema.update()

    def trained_modules(self) -> list[nn.Module]:
        """Modules that hold trainable parameters (put in train mode, wrapped by accelerate)."""
        return [self.comps.unet]

    # --- shared behaviour -----------------------------------------------------------------
    def set_train(self, train: bool) -> None:
        """Training mode (offloaded encoders away) or inference mode (all on the device)."""
        for module in self.train_mode_modules():
            module.train(train)
        self._place_offloaded(away=train)

    def train_mode_modules(self) -> list[nn.Module]:
        """The trained modules plus, with gradient checkpointing, the UNet and the text
        encoders gradients flow through: diffusers and transformers checkpoint only in train
        mode (as invoke-training, which calls ``.train()`` for this). Their dropout is 0, so
        train mode changes nothing else."""
        modules = list(self.trained_modules())
        if self.cfg.gradient_checkpointing:
            modules.append(self.comps.unet)
            if self.train_text_encoders:
                modules.extend(self.comps.text_encoders)
        return modules

    def cached_encoders(self) -> list[nn.Module]:
        """Frozen encoders that training steps never run once the caches are warm."""
        modules: list[nn.Module] = []
        if self.latents.cache is not None:
            modules.append(self.comps.vae)
        if self.text.cache is not None and not self.train_text_encoders:
            modules.extend(self.comps.text_encoders)
        return modules

    @torch.no_grad()
    def warm_caches(self, batches: Iterable[Batch]) -> None:
        """Fill the enabled latent / text caches from ``batches`` (every example once), then
        move the encoders they replace to ``OFFLOAD_DEVICE`` until validation needs them:
        lower peak memory during steps. Uses no random numbers."""
        for batch in batches:
            if self.latents.cache is not None:
                self.latents.fill(batch, self.device)
            if self.text.cache is not None:
                self.text.encode(list(batch["caption"]), self.device)
        self.offloaded = self.cached_encoders()
        self._place_offloaded(away=True)

    def _place_offloaded(self, *, away: bool) -> None:
        if not self.offloaded:
            return
        for module in self.offloaded:
            module.to(OFFLOAD_DEVICE if away else self.device)
        if away and self.device.type == "cuda":
            torch.cuda.empty_cache()  # hand the freed blocks back for the UNet's activations

    @contextmanager
    def averaged(self) -> Iterator[None]:
        """The EMA weights in the model for the block (validation, export); a no-op
        without ``ema_decay``."""
        if self.ema is None:
            yield
            return
        with self.ema.applied():
            yield

    def trainable_dtype(self) -> torch.dtype | None:
        """dtype of the trained weights in a checkpoint (None: each parameter's own)."""
        return torch.float32

    def save_trainable(self, path: Path) -> None:
        """The exact trained weights to ``path``, streamed one tensor at a time."""
        write_safetensors(self.trainable_parameters(), path, dtype=self.trainable_dtype())

    def load_trainable(self, path: Path) -> None:
        """Copy the weights ``save_trainable`` wrote back into the parameters."""
        copy_into(path, {n: p.detach() for n, p in self.trainable_parameters().items()})

    def loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Noise-prediction loss of one micro-batch (float32 scalar).

        With ``lora_dropout`` the dropout masks (drawn from torch's global RNG) come from a
        seed of (the generator's initial seed, step, micro-batch), computed on the host (a seed
        drawn on the device would need a host sync to reach ``manual_seed``), so they resume
        exactly whatever else used that RNG."""
        if not self.lora_dropout:
            return self._loss(batch, generator)
        step, micro = self._micro_batch
        self._micro_batch = (step, micro + 1)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(dropout_seed(generator.initial_seed(), step, micro))
            DropoutRows.current = Rows.of(batch, self.device)  # until the next micro-batch
            return self._loss(batch, generator)

    def _loss(self, batch: Batch, generator: torch.Generator) -> torch.Tensor:
        device = self.device
        rows = Rows.of(batch, device)
        latents = self.latents.sample(batch, device, generator, rows)
        noise = rows.randn(tuple(latents.shape[1:]), generator, latents.dtype).to(device)
        noise = self.noise.offset(noise, generator, rows)
        scheduler = self.comps.noise_scheduler
        timesteps = self.noise.timesteps(rows, scheduler.config.num_train_timesteps, generator)
        noisy = scheduler.add_noise(
            latents, self.noise.perturbed(noise, generator, rows), timesteps
        )
        with torch.set_grad_enabled(self.train_text_encoders and torch.is_grad_enabled()):
            hidden, pooled = self.text.encode(list(batch["caption"]), device)
        unet = self.comps.unet if self.compiled_unet is None else self.compiled_unet
        unet_dtype = dtype_of(self.comps.unet)  # diffusers' .dtype walks every module
        kwargs: dict[str, Any] = {}
        if pooled is not None:
            h, w = batch["pixel_values"].shape[-2:]
            kwargs["added_cond_kwargs"] = {
                "text_embeds": pooled.to(unet_dtype),
                "time_ids": sdxl_time_ids(batch, h, w, device),
            }
        pred = unet(
            noisy.to(unet_dtype), timesteps, hidden.to(unet_dtype), return_dict=False, **kwargs
        )[0]
        target = training_target(scheduler, self.prediction_type, latents, noise, timesteps)
        return diffusion_loss(
            pred,
            target,
            timesteps,
            scheduler,
            self.prediction_type,
            self.cfg.min_snr_gamma,
            loss_type=self.cfg.loss_type,
            huber_c=self.cfg.huber_c or DEFAULT_HUBER_C,
            mask=batch.get("mask"),
            loss_weight=_weights(batch),
        )


def dropout_seed(base: int, step: int, micro: int) -> int:
    """A 62-bit seed for one micro-batch's dropout masks, from host integers only."""
    digest = hashlib.blake2b(f"{base}:{step}:{micro}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def _weights(batch: Batch) -> torch.Tensor | None:
    """Per-example loss weights: the dataset's, times each example's share of its global
    batch (several processes: see ``runner.data.buckets.Slots``)."""
    weight, share = batch.get("loss_weight"), batch.get("share")
    if share is None or all(s == 1.0 for s in share):
        return weight
    shares = torch.tensor(share, dtype=torch.float32)
    return shares if weight is None else weight * shares


def enable_gradient_checkpointing(modules: list[nn.Module]) -> None:
    """diffusers / transformers gradient checkpointing. transformers models use the
    non-reentrant variant: the reentrant one gives parameters inside a checkpointed layer no
    gradient when the layer's input needs none (a text-encoder LoRA over frozen embeddings),
    which is why invoke-training sets ``embeddings.requires_grad_(True)``."""
    non_reentrant = {"use_reentrant": False}
    for module in modules:
        if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
            module.enable_gradient_checkpointing()
        elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
        elif hasattr(module, "gradient_checkpointing_enable"):  # transformers 4.x
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
