"""Training step time: kubetune's step vs a bare diffusers-example-style LoRA loop, in one run.

Default: the tiny SD1.5-shaped model on whatever device is present (framework overhead;
goal ≤ 1.05×). ``--full``: full-size SD1.5 (512², batch 4) and SDXL (1024², batch 1 and 4)
models built from the official configs with random weights (no download), LoRA rank 16,
bf16, with and without gradient checkpointing: images/s, peak memory and MFU for both loops.
``--full`` needs CUDA; on a CPU it prints "no CUDA" and exits 0.

    python benchmarks/train_step.py [--steps 20] [--rounds 3]
    python benchmarks/train_step.py --full
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from runner.config import parse_config  # noqa: E402
from runner.models.loading import Components, load_components  # noqa: E402
from runner.models.tiny import TOKENIZER_DIR, build_tiny_sd  # noqa: E402

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                 beta_schedule="scaled_linear", prediction_type="epsilon")
Step = Callable[[dict[str, Any]], Any]


# --- models ----------------------------------------------------------------------------------

def full_components(sdxl: bool, dtype: torch.dtype, seed: int = 0) -> Components:
    """Full-size SD1.5 / SDXL modules from the official configs, random weights."""
    torch.manual_seed(seed)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, hidden_act="quick_gelu",
                            eos_token_id=49407, bos_token_id=49406, projection_dim=768)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
        scaling_factor=0.13025 if sdxl else 0.18215)
    if not sdxl:
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        return Components(tokenizer, CLIPTextModel(clip_l).to(dtype), vae.to(dtype),
                          unet.to(dtype), DDPMScheduler(**SCHEDULER), is_sdxl=False)
    clip_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                            num_hidden_layers=32, num_attention_heads=20,
                            max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                            eos_token_id=49407, bos_token_id=49406)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    return Components(tokenizer, CLIPTextModel(clip_l).to(dtype), vae.to(dtype),
                      unet.to(dtype), DDPMScheduler(**SCHEDULER), is_sdxl=True,
                      tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR,
                                                                model_max_length=77),
                      text_encoder_2=CLIPTextModelWithProjection(clip_g).to(dtype))


def tiny_components(model_dir: Path, dtype: torch.dtype) -> Components:
    return load_components(str(model_dir), weight_dtype=dtype)


def place(comps: Components, device: torch.device) -> Components:
    for module in (comps.unet, comps.vae, *comps.text_encoders):
        module.to(device).requires_grad_(False)
    return comps


def make_batch(batch: int, side: int, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": (torch.rand(batch, 3, side, side, generator=g) * 2 - 1).to(device),
            "caption": [f"a photo of a cat number {i}" for i in range(batch)],
            "original_size_hw": torch.tensor([[side, side]] * batch),
            "crop_top_left_yx": torch.zeros(batch, 2, dtype=torch.long),
            "id": [str(i) for i in range(batch)]}


# --- the two loops -----------------------------------------------------------------------------

def kubetune_step(comps: Components, args: argparse.Namespace, device: torch.device) -> Step:
    """kubetune's own pipeline + StepRunner (what ``runner.train`` runs per step)."""
    from runner.loop import StepRunner
    from runner.optim import build_lr_scheduler, build_optimizer
    from runner.pipelines.common import enable_gradient_checkpointing
    from runner.pipelines.lora import LoraPipeline
    from runner.train import make_accelerator

    cfg = parse_config(yaml.safe_dump({
        "type": "SDXL_LORA" if comps.is_sdxl else "SD_LORA", "base_output_dir": "/tmp/bench",
        "lora_rank_dim": args.rank, "train_text_encoder": False, "min_snr_gamma": None,
        "mixed_precision": args.mixed_precision, "weight_dtype": args.dtype,
        "max_train_steps": 1, "save_every_n_steps": 1, "data_loader": {
            "type": "IMAGE_CAPTION_SD_DATA_LOADER", "resolution": args.side,
            "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": "/tmp"}}}))
    accelerator = make_accelerator(cfg)
    torch.manual_seed(0)
    pipeline = LoraPipeline(cfg, comps, device)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing([comps.unet])
    optimizer = accelerator.prepare(build_optimizer(cfg.optimizer, pipeline.param_groups(),
                                                    device))
    scheduler = build_lr_scheduler("constant", optimizer, warmup_steps=0, total_steps=10**6)
    pipeline.set_train(True)
    runner = StepRunner(accelerator, pipeline, optimizer, scheduler,
                        torch.Generator(device).manual_seed(0), None)
    return lambda batch: runner.run([batch], 0)


def bare_step(comps: Components, args: argparse.Namespace, device: torch.device) -> Step:
    """A loop written like diffusers' ``train_text_to_image_lora(_sdxl).py``."""
    unet, vae, scheduler = comps.unet, comps.vae, comps.noise_scheduler
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    autocast = args.mixed_precision == "bf16"

    def encode(tokenizer: Any, captions: list[str]) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def step(batch: dict[str, Any]) -> torch.Tensor:
        pixels = batch["pixel_values"].to(device, vae.dtype)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (latents.shape[0],), device=device)
            noisy = scheduler.add_noise(latents, noise, t)
            with torch.no_grad():
                added = None
                if comps.is_sdxl:
                    o1 = comps.text_encoder(encode(comps.tokenizer, batch["caption"]),
                                            output_hidden_states=True)
                    o2 = comps.text_encoder_2(encode(comps.tokenizer_2, batch["caption"]),
                                              output_hidden_states=True)
                    hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
                    h, w = pixels.shape[-2:]
                    ids = torch.tensor([[h, w, 0, 0, h, w]] * len(pixels), device=device)
                    added = {"text_embeds": o2.text_embeds, "time_ids": ids}
                else:
                    hidden = comps.text_encoder(encode(comps.tokenizer, batch["caption"]))[0]
            pred = unet(noisy.to(unet.dtype), t, hidden, added_cond_kwargs=added,
                        return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step


# --- measuring ---------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Step, batch: dict[str, Any], steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps (one sync at the end, like training)."""
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(batch)
    sync(device)
    return (time.perf_counter() - start) / steps


def step_flops(step: Step, batch: dict[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return float(counter.get_total_flops())


def peak_tflops() -> float | None:
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def measure(label: str, steps: dict[str, Step], batch: dict[str, Any],
            args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Interleave rounds of both loops (fair under noisy neighbours); median s/step."""
    for step in steps.values():
        time_steps(step, batch, args.warmup, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, batch, args.steps, device))
    result = {name: statistics.median(t) for name, t in times.items()}
    images = len(batch["caption"])
    ratio = result["kubetune"] / result["bare"]
    print(f"{label}: kubetune {result['kubetune'] * 1e3:.1f} ms/step "
          f"({images / result['kubetune']:.2f} img/s), bare {result['bare'] * 1e3:.1f} ms/step "
          f"({images / result['bare']:.2f} img/s), step-time ratio {ratio:.3f}x", flush=True)
    return result


def run_tiny(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_sd(Path(tmp) / "tiny-sd")
        steps = {"kubetune": kubetune_step(place(tiny_components(model, dtype), device), args,
                                           device),
                 "bare": bare_step(place(tiny_components(model, dtype), device), args, device)}
    batch = make_batch(args.batch, args.side, device)
    measure(f"tiny SD1.5 {args.side}px batch {args.batch} {args.dtype} on {device.type}",
            steps, batch, args, device)


def run_full_case(sdxl: bool, side: int, batch_size: int, gc: bool,
                  args: argparse.Namespace) -> None:
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    args.side, args.gradient_checkpointing = side, gc
    label = (f"{'SDXL' if sdxl else 'SD1.5'} {side}px batch {batch_size} rank {args.rank} "
             f"{args.dtype}{' +GC' if gc else ''}")
    batch = make_batch(batch_size, side, device)
    results, peaks, flops = {}, {}, {}
    for name, build in (("kubetune", kubetune_step), ("bare", bare_step)):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        step = build(place(full_components(sdxl, dtype), device), args, device)
        flops[name] = step_flops(step, batch)
        time_steps(step, batch, args.warmup, device)
        results[name] = statistics.median(time_steps(step, batch, args.steps, device)
                                          for _ in range(args.rounds))
        peaks[name] = torch.cuda.max_memory_allocated() / 2**30
        del step
    peak = peak_tflops()
    parts = []
    for name in ("kubetune", "bare"):
        mfu = (f", MFU {flops[name] / results[name] / (peak * 1e12) * 100:.1f}%" if peak
               else "")
        parts.append(f"{name} {batch_size / results[name]:.2f} img/s, peak "
                     f"{peaks[name]:.1f} GiB{mfu}")
    print(f"{label}: " + "; ".join(parts) + f"; images/s ratio "
          f"{results['bare'] / results['kubetune']:.3f}x, memory ratio "
          f"{peaks['kubetune'] / peaks['bare']:.3f}x", flush=True)


def run_full(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("no CUDA: --full needs a GPU; nothing measured")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    args.dtype, args.mixed_precision = "bfloat16", "bf16"
    for sdxl, side, batch in ((False, 512, 4), (True, 1024, 1), (True, 1024, 4)):
        for gc in (False, True):
            run_full_case(sdxl, side, batch, gc, args)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="full-size models (CUDA only)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.full:
        return run_full(args)
    run_tiny(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
