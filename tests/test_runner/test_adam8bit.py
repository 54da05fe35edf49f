"""8-bit AdamW (``optimizer.use_8bit``: bitsandbytes' AdamW8bit; from bitsandbytes 0.50 it runs
on the CPU too): a run stopped by the SIGTERM flag and resumed ends with the weights and the
8-bit optimizer state (uint8 moments, their per-block maxima, the step) of an uninterrupted
run, bit for bit; without a bitsandbytes that can run it, the run stops before the model loads
with one line saying what to install."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from train_support import checkpoint_weights, make_config, train, training_images

from kubetune.errors import Preempted, UserError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]  # tiny_sdxl_dir
pytestmark = pytest.mark.timeout(600)
KIND = "SDXL_FINETUNE"  # a full UNet: tensors of >= 4,096 values get 8-bit state
ADAM_8BIT = {"optimizer_type": "AdamW", "use_8bit": True, "learning_rate": 1e-3}

data_dir = training_images(n=4)


@pytest.fixture(autouse=True)
def _bitsandbytes_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo ``leave_out_bitsandbytes`` of a runner entrypoint run in this process before."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        monkeypatch.delitem(sys.modules, "bitsandbytes")


def _bitsandbytes_runs_here() -> bool:
    try:
        version = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return False
    return torch.cuda.is_available() or tuple(int(p) for p in version.split(".")[:2]) >= (0, 50)


def _state(out: Path, step: int) -> dict[str, Any]:
    folder = out / "checkpoints" / f"step-{step:06d}"
    return torch.load(folder / "training_state.pt", map_location="cpu", weights_only=True)


def _flat(state: Any, prefix: str = "") -> dict[str, Any]:
    """Every tensor and number in a nested state dict, by its path."""
    if isinstance(state, (torch.Tensor, int, float)):
        return {prefix: state}
    if not isinstance(state, (dict, list, tuple)):
        return {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flat(value, f"{prefix}.{key}"))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return bool(a == b)


@pytest.mark.slow
@pytest.mark.skipif(not _bitsandbytes_runs_here(), reason="needs bitsandbytes >= 0.50 (or CUDA)")
def test_a_preempted_8bit_adamw_run_resumes_with_the_uninterrupted_state(
    tiny_sdxl_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    kwargs: dict[str, Any] = dict(max_train_steps=3, save_every_n_steps=100, optimizer=ADAM_8BIT)
    train(make_config(KIND, tiny_sdxl_dir, data_dir, tmp_path / "ref", **kwargs))
    out = tmp_path / "run"
    cfg = make_config(KIND, tiny_sdxl_dir, data_dir, out, **kwargs)
    stop = threading.Event()
    stop.set()  # the SIGTERM flag already raised: one step, its checkpoint, Preempted
    with pytest.raises(Preempted, match="after step 1"):
        train(cfg, stop=stop)
    assert train(cfg).step == 3

    ref, got = _flat(_state(tmp_path / "ref", 3)["optimizer"]), _flat(_state(out, 3)["optimizer"])
    eight_bit = [
        k for k, v in ref.items() if isinstance(v, torch.Tensor) and v.dtype == torch.uint8
    ]
    assert len(eight_bit) >= 2, "no 8-bit optimizer state: bitsandbytes' AdamW8bit did not run"
    assert ref.keys() == got.keys()
    assert [k for k in ref if not _same(ref[k], got[k])] == []
    assert any(k.endswith(".step") and v == 3 for k, v in got.items())
    want, have = checkpoint_weights(tmp_path / "ref", 3), checkpoint_weights(out, 3)
    assert want.keys() == have.keys()
    assert [k for k in want if not torch.equal(want[k], have[k])] == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
@pytest.mark.parametrize(("installed", "says"), [
    (None, "optimizer.use_8bit needs bitsandbytes: pip install 'kubetune[adam8bit]'"),
    ("0.49.2", "optimizer.use_8bit on the CPU needs bitsandbytes >= 0.50 (installed: 0.49.2)"),
], ids=["missing", "0.49"])  # fmt: skip
def test_without_a_bitsandbytes_that_runs_here_the_run_stops_before_the_model_loads(
    installed: str | None, says: str, monkeypatch: pytest.MonkeyPatch, data_dir: Path,
    tmp_path: Path,
) -> None:  # fmt: skip
    """The installed bitsandbytes version is faked (``installed``): the check reads it, not
    the package."""
    from runner.training import optim

    monkeypatch.setattr(optim, "bitsandbytes_version", lambda: installed)
    out = tmp_path / "run"
    cfg = make_config(KIND, tmp_path / "no-such-model", data_dir, out, optimizer=ADAM_8BIT)
    with pytest.raises(UserError) as info:
        train(cfg)
    assert str(info.value).splitlines()[0].startswith(says)
    assert len(str(info.value).splitlines()) == 1
    assert not out.exists()


@pytest.mark.skipif(not _bitsandbytes_runs_here(), reason="needs bitsandbytes >= 0.50 (or CUDA)")
def test_8bit_adamw_is_bitsandbytes_on_the_cpu() -> None:
    import bitsandbytes as bnb

    from kubetune.config import AdamOptimizerConfig
    from runner.training.optim import build_optimizer

    big = torch.nn.Parameter(torch.ones(64, 64))  # >= 4,096 values: 8-bit state
    optimizer = build_optimizer(AdamOptimizerConfig(use_8bit=True), [{"params": [big]}],
                                torch.device("cpu"))  # fmt: skip
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    big.grad = torch.full_like(big, 0.5)
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8 and float(big.detach().max()) < 1.0


@pytest.mark.parametrize("use_8bit", [False, True])
def test_only_a_run_that_asks_for_8bit_adamw_imports_bitsandbytes(
    use_8bit: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """peft imports bitsandbytes whenever it is installed (~1-3 s: torch's compiler); the
    runner's entrypoint marks it absent for a run without ``optimizer.use_8bit``."""
    import importlib.util
    from types import SimpleNamespace

    from runner.__main__ import leave_out_bitsandbytes

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)  # restored afterwards
    leave_out_bitsandbytes(SimpleNamespace(optimizer=SimpleNamespace(use_8bit=use_8bit)))
    assert ("bitsandbytes" in sys.modules) is not use_8bit
    if not use_8bit:
        assert importlib.util.find_spec("bitsandbytes") is None  # what peft asks
        with pytest.raises(ImportError):
            import bitsandbytes  # noqa: F401
