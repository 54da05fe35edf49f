"""The streaming safetensors writer/reader that full fine-tune checkpoints use: its files are
ordinary safetensors files (safetensors' own loader reads them back exactly), casts apply to
floating-point tensors only, and it never builds the whole file in memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runner.checkpoint.safetensors_stream import copy_into, write_safetensors

REPO = Path(__file__).resolve().parents[2]


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w.bf16": torch.randn(3, 5, generator=g).bfloat16(),
        "w.f32": torch.randn(7, generator=g),
        "w.f16": torch.randn(2, 2, 2, generator=g).half(),
        "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g).t(),  # not contiguous
    }


def test_files_read_back_exactly_with_safetensors(tmp_path: Path) -> None:
    tensors = _tensors()
    write_safetensors(tensors, tmp_path / "a.safetensors", metadata={"format": "pt"})
    back = load_file(tmp_path / "a.safetensors")
    assert back.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_a_dtype_casts_floats_only(tmp_path: Path) -> None:
    tensors = _tensors()
    write_safetensors(tensors, tmp_path / "h.safetensors", dtype=torch.float16)
    back = load_file(tmp_path / "h.safetensors")
    assert back["ids"].dtype == torch.int64 and back["mask"].dtype == torch.bool
    assert torch.equal(back["w.bf16"], tensors["w.bf16"].half())
    assert torch.equal(back["w.f32"], tensors["w.f32"].half())


def test_copy_into_fills_existing_tensors_and_names_missing_keys(tmp_path: Path) -> None:
    tensors = _tensors()
    write_safetensors(tensors, tmp_path / "a.safetensors")
    target = {"w.bf16": torch.zeros(3, 5, dtype=torch.float32), "ids": torch.zeros(2, 3).long()}
    copy_into(tmp_path / "a.safetensors", target)
    assert torch.equal(target["w.bf16"], tensors["w.bf16"].float())
    assert torch.equal(target["ids"], tensors["ids"])
    with pytest.raises(KeyError, match="nope"):
        copy_into(tmp_path / "a.safetensors", {"nope": torch.zeros(1)})


PEAK = """
import sys, torch
from runner.checkpoint.safetensors_stream import write_safetensors
from safetensors.torch import save_file

def status_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

tensors = {f"layer{i}": torch.ones(16 * 2**20 // 4) for i in range(32)}  # 32 x 16 MiB
# The peak of this process's own memory from here on: reset the high-water mark (Linux >= 4.0;
# getrusage's ru_maxrss would also count the forking pytest process's size, kept over exec).
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status_kib("VmRSS")
if sys.argv[1] == "stream":
    write_safetensors(tensors, sys.argv[2], dtype=torch.float16)
else:  # convert first, then save_file: what a checkpoint of a GPU model in fp16 needs
    save_file({k: v.half() for k, v in tensors.items()}, sys.argv[2])
print((status_kib("VmHWM") - before) // 1024)
"""


@pytest.mark.slow
def test_peak_memory_is_one_tensor_not_the_whole_file(tmp_path: Path) -> None:
    """512 MiB of float32 saved as float16: the streaming writer's peak RSS grows by a few
    converted tensors (allocator slack), not with the model; converting everything first for
    save_file grows by the whole 256 MiB result (measured beside it, so the check can tell
    the two apart)."""
    grown = {}
    for how in ("stream", "convert_first"):
        out = subprocess.run(
            [sys.executable, "-c", PEAK, how, str(tmp_path / f"{how}.safetensors")],
            cwd=REPO, capture_output=True, text=True, check=True, timeout=120,
        )  # fmt: skip
        grown[how] = int(out.stdout.split()[-1])
    assert grown["stream"] < 96 and grown["convert_first"] > 224, grown  # MiB
