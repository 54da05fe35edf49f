"""Training knobs beyond invoke-training (issue 15): what kohya-ss, SimpleTuner and the
diffusers example scripts offer. Every field is a kubetune extension that defaults to
invoke-training's behaviour, so a config that leaves them out trains exactly as before."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kubetune.config.base import ConfigModel, Problems

TimestepSampling = Literal["uniform", "earlier", "later", "logit_normal"]
LossType = Literal["l2", "huber", "smooth_l1"]
BIASED_SAMPLING = ("earlier", "later")
DEFAULT_BIAS_MULTIPLIER = 2.0
DEFAULT_BIAS_PORTION = 0.25
DEFAULT_HUBER_C = 0.1


class TrainingKnobs(ConfigModel):
    """Noise, timestep, loss and EMA knobs shared by every training type."""

    noise_offset: float = Field(default=0.0, ge=0, le=1)
    """Offset noise (kubetune extension; kohya / diffusers `noise_offset`): adds this times
    one random value per image and latent channel to the noise, so the model can learn very
    dark or bright images. 0 (default) disables it; 0.05-0.1 is usual."""
    input_perturbation: float = Field(default=0.0, ge=0, le=1)
    """Input perturbation (kubetune extension; diffusers `input_perturbation`): the noisy
    latents use the noise plus this times fresh gaussian noise while the target keeps the
    original noise. 0 (default) disables it; 0.1 is usual."""
    timestep_sampling: TimestepSampling = "uniform"
    """How training timesteps are drawn (kubetune extension): `uniform` (default, as
    invoke-training), `earlier` / `later` (favour the low-noise / high-noise end: detail vs
    composition; see timestep_bias_*), or `logit_normal` (SD3-style, concentrated on the
    middle timesteps: sigmoid of a standard normal)."""
    timestep_bias_multiplier: float | None = Field(default=None, gt=1)
    """earlier / later only: how much more likely a favoured timestep is than the others
    (kubetune extension; default 2.0, as the diffusers SDXL script)."""
    timestep_bias_portion: float | None = Field(default=None, gt=0, lt=1)
    """earlier / later only: the fraction of the timesteps that is favoured
    (kubetune extension; default 0.25)."""
    zero_terminal_snr: bool = False
    """Rescale the noise schedule so the last timestep is pure noise (kubetune extension;
    Lin et al. 2023, diffusers `rescale_betas_zero_snr`). Needs prediction_type:
    v_prediction; validation then samples with trailing timestep spacing."""
    loss_type: LossType = "l2"
    """Per-element loss (kubetune extension; diffusers / kohya `loss_type`): `l2` (default,
    mean squared error), `huber` (pseudo-Huber scaled by huber_c) or `smooth_l1`
    (pseudo-Huber without the scale). Min-SNR weighting applies on top of any of them."""
    huber_c: float | None = Field(default=None, gt=0)
    """huber / smooth_l1 only: the pseudo-Huber transition point (kubetune extension;
    default 0.1, as kohya and diffusers)."""
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Keep an exponential moving average of the trained weights with this decay
    (kubetune extension; e.g. 0.999). Validation images, checkpoint outputs and final/ use the
    averaged weights; training continues on the raw ones. None (default) disables it."""
    ema_on_cpu: bool = False
    """Hold the EMA copy in CPU memory instead of on the GPU (kubetune extension; slower
    steps, less GPU memory). Needs ema_decay."""

    def _knob_problems(self, p: Problems) -> None:
        if self.timestep_sampling not in BIASED_SAMPLING:
            for name in ("timestep_bias_multiplier", "timestep_bias_portion"):
                p.check(
                    getattr(self, name) is None,
                    name,
                    f"only used by timestep_sampling earlier / later (it is "
                    f"{self.timestep_sampling}): remove it or change timestep_sampling",
                )
        p.check(
            self.huber_c is None or self.loss_type != "l2",
            "huber_c",
            "only used by loss_type huber / smooth_l1: remove it or change loss_type",
        )
        p.check(
            not self.ema_on_cpu or self.ema_decay is not None,
            "ema_on_cpu",
            "there is no EMA without ema_decay: set ema_decay (e.g. 0.999) or remove it",
        )
        prediction = getattr(self, "prediction_type", None)
        p.check(
            not self.zero_terminal_snr or prediction == "v_prediction",
            "zero_terminal_snr",
            "a zero-SNR last timestep leaves epsilon prediction nothing to predict from: "
            "set prediction_type: v_prediction or zero_terminal_snr: false",
        )


class LoraKnobs(ConfigModel):
    """LoRA-only knobs: DoRA and adapter dropout (through peft)."""

    use_dora: bool = False
    """Train DoRA (weight-decomposed LoRA, via peft) instead of plain LoRA
    (kubetune extension). Needs lora_checkpoint_format: invoke_peft (the kohya file cannot
    hold DoRA's magnitude vectors)."""
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the LoRA branch's input during training (kubetune extension; peft
    `lora_dropout`). 0 (default) disables it."""

    def _lora_knob_problems(self, p: Problems) -> None:
        fmt = getattr(self, "lora_checkpoint_format", None)
        p.check(
            not self.use_dora or fmt != "kohya",
            "use_dora",
            "the kohya LoRA format cannot hold DoRA magnitude vectors: set "
            "lora_checkpoint_format: invoke_peft or use_dora: false",
        )
