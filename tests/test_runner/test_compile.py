"""``compile_unet`` (issue #28): the training steps call a compiled UNet that compiles once
per input shape (recompiles bounded by the run's bucket count), validation calls the eager
UNet (no compile for eval mode / CFG batch 2), and a machine without a C compiler or Python
headers fails before training with the reason. Compiling is counted with dynamo's
``CompileCounter`` backend (graphs captured, no kernels built), so the test runs on CPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import load_pipeline, make_config, write_dataset

from kubetune.errors import UserError
from runner.training import compile as compiling

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(600)
CPU = torch.device("cpu")


def _batch(h: int, w: int, n: int = 2) -> dict[str, Any]:
    pixels = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {"pixel_values": pixels, "caption": ["a kbtn picture"] * n, "id": list("ab")[:n]}


def test_a_machine_without_compiler_or_headers_is_refused_with_the_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert "no C compiler" in (compiling.compiler_problem() or "")
    with pytest.raises(UserError, match="compile_unet: no C compiler"):
        compiling.compile_for_training(torch.nn.Linear(2, 2), shapes=2)
    monkeypatch.setenv("CC", "/usr/bin/cc")
    monkeypatch.setattr(compiling.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    assert "no Python headers" in (compiling.compiler_problem() or "")


def test_training_shapes_count_each_bucket_with_a_short_batch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert compiling.training_shapes([(64, 64), (64, 64), (48, 64), (64, 48)]) == 6
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", "eager")
    with torch._dynamo.config.patch(recompile_limit=8, accumulated_recompile_limit=8):
        compiling.compile_for_training(torch.nn.Linear(2, 2), shapes=6)
        assert "input shapes" not in caplog.text
        compiling.compile_for_training(torch.nn.Linear(2, 2), shapes=40)
        assert "compile_unet: 40 input shapes" in caplog.text
        assert torch._dynamo.config.recompile_limit >= 41
        assert torch._dynamo.config.accumulated_recompile_limit >= 41


@pytest.fixture
def counting_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Dynamo with a counting backend and a recompile limit of 1 (restored afterwards), so
    only ``compile_for_training`` can make room for a second shape."""
    from torch._dynamo.testing import CompileCounter

    if compiling.compiler_problem() is not None:
        pytest.skip(compiling.compiler_problem() or "")
    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(compiling, "COMPILE_BACKEND", counter)
    with torch._dynamo.config.patch(recompile_limit=1):
        yield counter
    torch._dynamo.reset()


@pytest.mark.slow
def test_steps_compile_once_per_shape_and_validation_stays_eager(
    tiny_sd_dir: Path, tmp_path: Path, counting_backend: Any
) -> None:
    from kubetune.storage import open_store
    from runner.session.settings import validation_settings
    from runner.training.validation import Validator

    counter = counting_backend
    data = write_dataset(tmp_path / "data", n=2)
    cfg = make_config("SD_LORA", tiny_sd_dir, data, tmp_path / "out", compile_unet=True,
                      validation_prompts=["a kbtn picture"], validate_every_n_steps=1,
                      num_validation_images_per_prompt=1,
                      num_validation_inference_steps=2)  # fmt: skip
    comps, pipe = load_pipeline(cfg)
    pipe.set_train(True)  # as a run does before its first step
    pipe.compiled_unet = compiling.compile_for_training(comps.unet, shapes=4)
    assert torch._dynamo.config.recompile_limit >= 5
    generator = torch.Generator().manual_seed(0)
    pipe.loss(_batch(64, 64), generator)
    first = counter.frame_count
    assert first >= 1
    pipe.loss(_batch(64, 64), generator)
    assert counter.frame_count == first  # the same shape: no recompile
    pipe.loss(_batch(48, 64), generator)
    pipe.loss(_batch(48, 64, n=1), generator)
    grown = counter.frame_count
    assert grown > first
    store = open_store(str(tmp_path / "store"))
    Validator(validation_settings(cfg), pipe, store, CPU).validate(1)
    assert counter.frame_count == grown  # validation ran the eager UNet
    pipe.loss(_batch(64, 64), generator)
    assert counter.frame_count == grown  # every shape still cached (limit sized for them)
