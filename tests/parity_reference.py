"""invoke-training's LoRA target modules (src/invoke_training/pipelines/_experimental/... and
the SD/SDXL LoRA configs at the commit named in tests/data/invoke_training_samples/README.md):
the reference both the config parity tests and the conformance tests compare against."""

from __future__ import annotations

UNET_TARGETS = [
    "to_q",
    "to_k",
    "to_v",
    "proj",
    "proj_in",
    "proj_out",
    "conv",
    "conv1",
    "conv2",
    "conv_shortcut",
    "to_out.0",
    "time_emb_proj",
    "ff.net.2",
]

TE_TARGETS = ["fc1", "fc2", "q_proj", "k_proj", "v_proj", "out_proj"]
