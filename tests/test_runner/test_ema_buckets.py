"""The EMA averages (and, in host memory, stages) its parameters in buckets of at most
``BUCKET_ELEMENTS``: a full fine-tune's float32 temporaries stay bounded, and the averages are
bit for bit those of one fused update over everything."""

from __future__ import annotations

import pytest
import torch

from runner.training import ema as ema_module
from runner.training.ema import EmaWeights, _buckets


def _params() -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (7,), (2, 2, 5), (1,), (30,)]
    return {
        f"p{i}": torch.nn.Parameter(torch.randn(*s, generator=g).bfloat16())
        for i, s in enumerate(shapes)
    }


def test_buckets_keep_order_and_bound_their_size() -> None:
    params = _params()
    groups = _buckets(params, 20)
    assert [n for g in groups for n in g] == list(params)
    for group in groups:
        total = sum(params[n].numel() for n in group)
        assert total <= 20 or len(group) == 1  # a larger parameter is a bucket alone
    assert len(groups) > 1


@pytest.mark.parametrize("host", [False, True])
def test_bucketed_updates_equal_one_fused_update(
    host: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = _params()
    place = torch.device("cpu") if host else None
    whole = EmaWeights(params, decay=0.9, device=place)
    monkeypatch.setattr(ema_module, "BUCKET_ELEMENTS", 12)
    small = EmaWeights(params, decay=0.9, device=place)
    assert len(small._buckets) > 1 and len(whole._buckets) == 1
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g).bfloat16())
        whole.update()
        small.update()
    for name in params:
        assert torch.equal(small.shadow[name], whole.shadow[name]), name
