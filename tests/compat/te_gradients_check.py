"""Text-encoder LoRA and TI gradients under gradient checkpointing, on whichever transformers
is importable: equal to the gradients without checkpointing, none missing. Exit 0 if so.

pytest covers the installed transformers
(tests/test_runner/test_gradient_checkpointing.py);
this script checks the oldest version pyproject.toml allows, without touching the venv:

    .venv/bin/pip install --target /tmp/tf4 --no-deps transformers==4.46.3 \
        tokenizers==0.20.3 huggingface_hub==0.36.0 diffusers==0.32.2
    PYTHONPATH=/tmp/tf4 .venv/bin/python tests/compat/te_gradients_check.py
"""

import sys

import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel

from runner.pipelines.base import enable_gradient_checkpointing
from runner.pipelines.lora import add_lora
from runner.pipelines.textual_inversion import TrainableTokenEmbedding


def grads(checkpointing: bool, ti: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=3,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
    )
    model = CLIPTextModel(cfg)
    model.requires_grad_(False)
    if ti:
        base = model.get_input_embeddings()
        model.set_input_embeddings(TrainableTokenEmbedding(base, 990, base.weight[990:992]))
    else:
        add_lora(model, rank=4, alpha=1.0, targets=["q_proj", "v_proj", "fc1"])
        for n, p in model.named_parameters():  # make B non-zero so A gets a gradient too
            if "lora_B" in n:
                torch.nn.init.normal_(p)
    if checkpointing:
        enable_gradient_checkpointing([model])
    model.train()
    ids = torch.tensor([[0, 5, 990, 991, 7, 2]])
    model(ids)[0].pow(2).mean().backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


print("transformers", transformers.__version__)
ok = True
for ti in (False, True):
    plain, ckpt = grads(False, ti), grads(True, ti)
    for name, g in plain.items():
        good = ckpt[name] is not None and torch.allclose(ckpt[name], g, atol=1e-6)
        ok &= good and float(g.abs().sum()) > 0
        if not good:
            print("MISMATCH", "TI" if ti else "LoRA", name, ckpt[name])
    print("TI" if ti else "TE LoRA", "params:", len(plain), "all gradients equal:", ok)
sys.exit(0 if ok else 1)
