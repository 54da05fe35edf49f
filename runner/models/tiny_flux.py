"""A tiny random-initialised FLUX.1-shaped pipeline for tests and local demos
(``model: builtin:tiny-flux``).

Real diffusers / transformers classes built from small configs and seeded: the shipped CLIP
tokenizer (``runner/assets/clip_tokenizer``) with a 5-layer CLIP text model, a 2-layer T5
encoder with a small Unigram tokenizer trained offline with the ``tokenizers`` library
(``runner/assets/t5_tokenizer/tokenizer.json``, made by ``train_t5_tokenizer``; Unigram
training is not bit-reproducible, so the file is committed), a ``FluxTransformer2DModel``
with one double and one single block and the guidance embedding of FLUX.1-dev, a 16-channel
``AutoencoderKL`` with FLUX's scaling and shift factors, and FLUX.1-dev's
``FlowMatchEulerDiscreteScheduler`` settings. ``FluxPipeline.from_pretrained(dir)`` loads it
offline; it trains at 64×64 on a CPU.

CLI: ``python -m runner.models.tiny_flux OUT_DIR [--seed N] [--single-file PATH]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

from runner.models.tiny import (
    WIDTH,
    _text_config,
    tiny_vae,
    write_model_index,
    write_tokenizer,
)

T5_TOKENIZER = Path(__file__).resolve().parent.parent / "assets" / "t5_tokenizer" / "tokenizer.json"
T5_WIDTH = 32
# FLUX.1-dev's scheduler/scheduler_config.json.
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
_SENTENCES = [
    "a photo of a cat sitting on a sofa",
    "a painting of a dog in the snow",
    "a stuffed gnome at the beach with a pina colada in its hand",
    "bruce the gnome",
    "a red car on a street at night",
    "the quick brown fox jumps over the lazy dog",
    "a drawing of a house with a garden and flowers",
    "an old man reading a book in a library",
]


def train_t5_tokenizer(path: str | Path) -> Path:
    """How the shipped T5 tokenizer was made: a Unigram model (T5's kind) trained on a few
    sentences, with T5's special tokens (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2) and ``</s>``
    appended to every sequence."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Replace(" +", " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tok.train_from_iterator(_SENTENCES * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.save(str(path))
    return Path(path)


def t5_tokenizer(model_max_length: int = 512) -> T5TokenizerFast:
    """The shipped tiny T5 tokenizer."""
    return T5TokenizerFast(
        tokenizer_file=str(T5_TOKENIZER), extra_ids=0, model_max_length=model_max_length
    )


def tiny_transformer() -> FluxTransformer2DModel:
    """One double-stream and one single-stream block, 2 heads of 16, guidance embedding."""
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels × a 2×2 patch, as FLUX.1
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=WIDTH,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def flux_vae() -> AutoencoderKL:
    """The tiny VAE with 16 latent channels and FLUX's factors, without quant convs."""
    return tiny_vae(0.3611, latent_channels=16, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)  # fmt: skip


def tiny_t5() -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=64,
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.1,  # as T5 v1.1: training must keep T5 in eval mode
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def build_tiny_flux(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny FLUX.1-shaped diffusers directory to ``out_dir`` and return its path."""
    out = Path(out_dir)
    torch.manual_seed(seed)
    tiny_transformer().save_pretrained(out / "transformer")
    flux_vae().save_pretrained(out / "vae")
    CLIPTextModel(_text_config(projection=False)).save_pretrained(out / "text_encoder")
    tiny_t5().save_pretrained(out / "text_encoder_2")
    write_tokenizer(out / "tokenizer")
    t5_tokenizer().save_pretrained(out / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(out / "scheduler")
    components = {
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_model_index(out, "FluxPipeline", components)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random FLUX.1-shaped model.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single-file", type=Path, default=None, help="also write its transformer as a BFL file"
    )
    args = parser.parse_args(argv)
    out = build_tiny_flux(args.out_dir, seed=args.seed)
    print(out)
    if args.single_file is not None:
        from runner.models.flux_keys import save_flux_single_file

        print(save_flux_single_file(out / "transformer", args.single_file))


if __name__ == "__main__":
    main()
