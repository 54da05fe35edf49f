"""Fast unit tests of the training pieces that need no model: losses, schedule, step
grouping, cadence, RNG state, progress lines."""

from __future__ import annotations

import logging
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler
from train_support import make_config

from kubetune.errors import DataError
from runner.checkpoint.state import LoopState, rng_state, set_rng_state
from runner.reporting.progress import ProgressReporter, ProgressSettings
from runner.session.build import plan_schedule
from runner.session.settings import training_settings
from runner.training.cadence import Cadence
from runner.training.loop import step_inputs
from runner.training.losses import diffusion_loss, snr


class ListLoader:
    """ResumableLoader's iteration contract over a list: each ``iter`` yields the rest of
    the current epoch; taking its last batch moves the cursor to the next epoch's start."""

    def __init__(self, n: int) -> None:
        self.n, self.position, self.epoch = n, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # type: ignore[no-untyped-def]
        epoch = self.epoch
        for index in range(self.position, self.n):
            self.position += 1
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
            yield {"caption": [f"e{epoch}b{index}"]}


def test_min_snr_weighting_matches_the_formula() -> None:
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([10, 500, 990])
    pred, target = torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2)
    ratio = snr(scheduler, t)
    expected = (torch.clamp(ratio, max=5.0) / ratio).mean()
    assert torch.allclose(diffusion_loss(pred, target, t, scheduler, "epsilon", 5.0), expected)
    # invoke-training floors the velocity objective's weight at one: min(SNR, γ)/SNR + 1
    v_expected = (torch.clamp(ratio, max=5.0) / ratio + 1).mean()
    assert torch.allclose(
        diffusion_loss(pred, target, t, scheduler, "v_prediction", 5.0), v_expected
    )
    assert diffusion_loss(pred, target, t, scheduler, "epsilon", None) == 1.0


def test_steps_never_cross_an_epoch_and_leave_the_position_to_the_loader() -> None:
    loader = ListLoader(5)
    items = step_inputs(loader, 2)
    sizes = []
    for _ in range(4):
        item = next(items)
        sizes.append((len(item.group), item.epoch, item.completed_epoch))
    assert sizes == [(2, 0, None), (2, 0, None), (1, 0, 1), (2, 1, None)]
    assert item.group[-1]["caption"] == ["e1b1"]
    assert (loader.epoch, loader.position) == (1, 2)
    assert [f.name for f in fields(LoopState)] == ["step"]  # the loop keeps only the step


def test_schedule_and_cadence(tmp_path: Path) -> None:
    cfg = make_config(
        "SD_LORA",
        tmp_path,
        tmp_path,
        tmp_path,
        max_train_steps=None,
        max_train_epochs=3,
        gradient_accumulation_steps=2,
        save_every_n_steps=None,
        save_every_n_epochs=2,
    )
    assert plan_schedule(training_settings(cfg), 5).total_steps == 9
    with pytest.raises(DataError):
        plan_schedule(training_settings(cfg), 0)
    every = Cadence(cfg.save_every_n_steps, cfg.save_every_n_epochs)
    assert [every.due(s, e) for s, e in ((3, 1), (6, 2), (7, None))] == [False, True, False]


def test_rng_state_round_trip() -> None:
    import random

    import numpy as np

    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


def test_progress_lines_and_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kubetune.storage import open_store

    store = open_store(str(tmp_path))
    progress = ProgressReporter(
        ProgressSettings(total_steps=4, steps_per_epoch=2, log_every_n_steps=2), store
    )
    with caplog.at_level(logging.INFO, logger="runner.reporting.progress"):
        for step in range(1, 5):
            progress.update(step, 0, torch.tensor(0.5), 1e-4, images=2)
        progress.finish("completed")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("\r" not in line for line in lines)
    assert lines[-1].startswith("step 4/4 epoch 1 loss 0.5000 lr 0.0001")
    record = __import__("json").loads((tmp_path / "progress.json").read_text())
    assert record["state"] == "completed" and record["step"] == 4


def test_optimizers_honour_group_learning_rates(tmp_path: Path) -> None:
    from kubetune.config import AdamOptimizerConfig, ProdigyOptimizerConfig
    from runner.training.optim import build_lr_scheduler, build_optimizer

    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    groups = [{"params": [a], "lr": 0.5}, {"params": [b]}]
    cpu = torch.device("cpu")
    adam = build_optimizer(AdamOptimizerConfig(learning_rate=1e-3), groups, cpu)
    assert isinstance(adam, torch.optim.AdamW)  # 8-bit: test_adam8bit.py
    assert [g["lr"] for g in adam.param_groups] == [0.5, 1e-3]
    prodigy = build_optimizer(ProdigyOptimizerConfig(), groups, cpu)
    assert type(prodigy).__name__ == "Prodigy"
    scheduler = build_lr_scheduler("linear", adam, warmup_steps=2, total_steps=10)
    assert [round(g["lr"], 6) for g in adam.param_groups] == [0.0, 0.0]
    adam.step()
    scheduler.step()
    assert [round(g["lr"], 6) for g in adam.param_groups] == [0.25, 0.0005]
