"""No hidden host syncs per step (issue #28): ``runner.training.syncs.SyncCounter`` counts the
Python-visible syncs (``item`` / ``__int__`` / ``__float__`` / ``__bool__`` / ``tolist`` /
``cpu`` / ``numpy`` on device tensors, blocking host↔device ``.to()`` / ``copy_``) of every
optimizer step after the first (the steady state) and of the log lines, separately.

This machine has no GPU, so the counter emulates one (see its docstring): the loader's batches
are host memory, everything else counts as device memory. The unfused CPU AdamW keeps its step
counter on the host (as it does on CUDA unless fused/capturable): marked host too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from data_fixtures import write_masked_jsonl
from train_support import make_config, model_for, train, training_images

from runner.training.syncs import SyncCounter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest_plugins = ["fixtures_models"]
pytestmark = pytest.mark.timeout(300)


data_dir = training_images(n=4)


def counted_run(cfg: Any, monkeypatch: pytest.MonkeyPatch) -> SyncCounter:
    """Train ``cfg``; steps after the first (and their progress updates) count under
    "step", log lines under "log"."""
    from runner.reporting import progress
    from runner.training import loop

    counter = SyncCounter(emulate_gpu=True)
    run, emit = loop.StepRunner.run, progress.ProgressReporter._emit

    def counted_step(self: Any, group: list[Any], step: int) -> torch.Tensor:
        counter.mark_host(group)
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        counter.mark_host([s.get("step") for s in optimizer.state.values()])
        with counter.phase("step" if step >= 1 else None):
            return run(self, group, step)

    def counted_emit(self: Any, *args: Any, **kwargs: Any) -> Any:
        with counter.phase("log"):
            return emit(self, *args, **kwargs)

    def counted_update(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        with counter.phase("step" if step >= 2 else None):  # a log line counts as "log"
            return update(self, step, *args, **kwargs)

    update = progress.ProgressReporter.update
    monkeypatch.setattr(progress.ProgressReporter, "update", counted_update)
    monkeypatch.setattr(loop.StepRunner, "run", counted_step)
    monkeypatch.setattr(progress.ProgressReporter, "_emit", counted_emit)
    with counter:
        assert train(cfg).step == cfg.max_train_steps
    return counter


COMMON = {"max_train_steps": 4, "log_every_n_steps": 2, "save_every_n_steps": 4}
CASES = {
    "sd-lora": ("SD_LORA", {}),
    "sdxl-lora": ("SDXL_LORA", {}),
    "sd-ti": ("SD_TEXTUAL_INVERSION", {}),
    "sdxl-lora-ti": ("SDXL_LORA_AND_TEXTUAL_INVERSION", {}),
    "sd-lora-knobs": (
        "SD_LORA",
        {
            "lora_dropout": 0.1,
            "ema_decay": 0.9,
            "ema_on_cpu": True,
            "min_snr_gamma": 5.0,
            "gradient_accumulation_steps": 2,
            "train_batch_size": 1,
        },
    ),  # fmt: skip
    "sd-lora-cached": (
        "SD_LORA",
        {
            "cache_vae_outputs": True,
            "cache_text_encoder_outputs": True,
            "train_text_encoder": False,
        },
    ),
}

SLOW_CASES = {"sdxl-lora", "sdxl-lora-ti", "sd-lora-knobs"}  # ~2 s each; the fast tier keeps SD


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CASES else c for c in CASES]
)
def test_zero_syncs_per_steady_state_step(
    case: str,
    request: pytest.FixtureRequest,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    kind, fields = CASES[case]
    model = model_for(kind, request)
    cfg = make_config(kind, model, data_dir, tmp_path, **{**COMMON, **fields})
    counter = counted_run(cfg, monkeypatch)
    assert counter.total("step") == 0, dict(counter.where["step"])
    assert counter.total("log") >= 2  # the loss read once per log line (2 lines): counted


@pytest.mark.parametrize("timestep_sampling", ["earlier", "later"])
def test_zero_syncs_with_masks_and_biased_timesteps(
    timestep_sampling: str, tiny_sd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    jsonl = write_masked_jsonl(tmp_path / "data", [(64, 64)] * 4)
    dataset = {"type": "IMAGE_CAPTION_JSONL_DATASET", "jsonl_path": str(jsonl)}
    loader = {"type": "IMAGE_CAPTION_SD_DATA_LOADER", "resolution": 64, "dataset": dataset}
    cfg = make_config("SD_LORA", tiny_sd_dir, tmp_path, tmp_path / "out", use_masks=True,
                      data_loader=loader, timestep_sampling=timestep_sampling,
                      **COMMON)  # fmt: skip
    counter = counted_run(cfg, monkeypatch)
    assert counter.total("step") == 0, dict(counter.where["step"])


def test_the_counter_sees_each_kind_of_sync() -> None:
    """The counter itself: reads of device tensors, blocking host→device copies, not the
    non-blocking ones, not host tensors, nothing outside a phase."""
    host = torch.ones(3)
    with SyncCounter(emulate_gpu=True) as counter:
        device = torch.ones(3)
        counter.mark_host([host])
        device.sum().item()  # outside a phase
        with counter.phase("p"):
            device.sum().item()
            int(device[0])
            float(device[0])
            bool(device[0])
            device.tolist()
            device.cpu()
            host.to("cpu")
            host.to("cpu", non_blocking=True)
            host.tolist()  # host memory: no sync
            device.to(torch.float64)  # dtype only
            device.copy_(host)
    assert counter.total("p") == 8, dict(counter.where["p"])
    kinds = {key.rsplit(" ", 1)[-1] for key in counter.where["p"]}
    assert {"item", "__int__", "__float__", "__bool__", "tolist", "cpu"} <= kinds
    assert torch.Tensor.item.__qualname__ == "TensorBase.item"  # restored


def test_ema_on_cpu_copies_all_weights_in_one_non_blocking_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``ema_on_cpu``: one copy of every trained tensor per update (non-blocking from a CUDA
    device), instead of one blocking device→host ``.to`` per tensor (~1.6k for an SDXL LoRA);
    the averages are the same."""
    from runner.training.ema import EmaWeights

    params = {f"p{i}": torch.nn.Parameter(torch.randn(3, 2)) for i in range(50)}
    ema = EmaWeights(params, 0.5, torch.device("cpu"))
    expected = {n: p.detach().clone() for n, p in params.items()}
    calls: list[str] = []
    to, copy_ = torch.Tensor.to, torch.Tensor.copy_

    def counted_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if args and not isinstance(args[0], torch.dtype) or "device" in kwargs:
            calls.append("to")
        return to(self, *args, **kwargs)

    def counted_copy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> Any:
        calls.append("copy_")
        return copy_(self, src, non_blocking)

    for step in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(1.0 + step)
        monkeypatch.setattr(torch.Tensor, "to", counted_to)
        monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
        ema.update()
        monkeypatch.undo()
        assert calls == ["copy_"], calls
        calls.clear()
        for name, p in params.items():
            expected[name].lerp_(p.detach(), 0.5)
    assert all(torch.allclose(ema.shadow[n], expected[n]) for n in params)
    assert all(torch.allclose(ema.state_dict()["shadow"][n], expected[n]) for n in params)


def test_periodic_progress_uploads_leave_the_training_thread(tmp_path: Path) -> None:
    """``progress.json`` and ``history.jsonl`` due at a log line are put by the upload thread
    (a slow store no longer stalls the step); ``finish`` publishes the final record on the
    caller's thread after them, so the last write wins."""
    import json
    import threading

    from kubetune.layout import PROGRESS_KEY
    from kubetune.storage import open_store
    from runner.reporting.progress import ProgressReporter, ProgressSettings

    store = open_store(str(tmp_path))
    threads: list[tuple[str, str]] = []
    put = store.put_bytes

    def recording_put(key: str, data: bytes) -> None:
        threads.append((key, threading.current_thread().name))
        put(key, data)

    store.put_bytes = recording_put  # type: ignore[method-assign]
    settings = ProgressSettings(total_steps=3, steps_per_epoch=3, log_every_n_steps=1,
                                write_every_s=0.0)  # fmt: skip
    progress = ProgressReporter(settings, store)
    for step in (1, 2, 3):
        progress.update(step, 0, torch.tensor(0.5), 1e-3, images=2)
    progress.finish("completed")
    main = threading.current_thread().name
    periodic, final = threads[:-2], threads[-2:]
    assert periodic and all(name.startswith("progress-upload") for _, name in periodic)
    assert [name for _, name in final] == [main, main]
    record = json.loads((tmp_path / PROGRESS_KEY).read_text())
    assert record["state"] == "completed" and record["step"] == 3


def test_biased_timesteps_draw_without_multinomial_from_a_cached_cdf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """earlier / later sampling: ``torch.multinomial`` reads its probabilities back with
    ``.item()`` when it draws one sample (batch 1: a sync inside the kernel call, invisible
    to the counter), and the weights were copied to the device every step. Now: inverse CDF
    from one ``torch.rand``, the CDF built once per device."""
    from runner.training import noise

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.multinomial used")

    monkeypatch.setattr(torch, "multinomial", refuse)
    noise.bias_cdf.cache_clear()
    settings = noise.NoiseSettings(timestep_sampling="later", bias_multiplier=4.0,
                                   bias_portion=0.25)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    one = [settings.timesteps(1, 1000, generator) for _ in range(3)]
    assert all(t.shape == (1,) and 0 <= int(t) < 1000 for t in one)
    assert noise.bias_cdf.cache_info().misses == 1  # built once, reused every step
    many = settings.timesteps(20000, 1000, generator)
    assert int(many.min()) >= 0 and int(many.max()) <= 999
    assert abs(float((many >= 750).float().mean()) - 4 / 7) < 0.02
