"""Multi-GPU data sharding: under ``accelerate launch`` each process's loader yields its own
disjoint slice of every global batch; together the ranks cover the epoch exactly once, in
lockstep (same number of batches), and one saved position resumes every rank.

The ranks are built side by side in this process (no multi-process training in tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import lora_config, write_image_dir

from kubetune.errors import ResumeMismatchError
from runner.data import build_train_dataloader
from runner.data.buckets import BucketBatchSampler

BUCKETS = {"target_resolution": 64, "start_dim": 32, "end_dim": 128, "divisible_by": 16}
SIZES = [
    (96, 48),
    (100, 50),
    (48, 96),
    (50, 110),
    (64, 64),
    (70, 70),
    (80, 60),
    (60, 80),
    (120, 40),
    (40, 120),
    (66, 64),
    (90, 45),
    (45, 90),
    (64, 66),
    (72, 72),
    (58, 58),
]


def _loaders(tmp_path: Path, world: int, **kw: object) -> list:  # type: ignore[type-arg]
    if not (tmp_path / "d").exists():
        write_image_dir(tmp_path / "d", SIZES)
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")}, **kw
    )
    return [
        build_train_dataloader(
            cfg, seed=3, batch_size=2, device_is_cuda=False, num_processes=world, process_index=rank
        )
        for rank in range(world)
    ]


def _ids(loader: object) -> list[list[str]]:
    return [list(b["id"]) for b in loader]  # type: ignore[attr-defined]


@pytest.mark.parametrize("buckets", [None, BUCKETS])
def test_two_ranks_get_disjoint_slices_that_cover_each_epoch(
    tmp_path: Path, buckets: object
) -> None:
    rank0, rank1 = _loaders(tmp_path, 2, aspect_ratio_buckets=buckets)
    single = _loaders(tmp_path, 1, aspect_ratio_buckets=buckets)[0]
    assert len(rank0) == len(rank1) < len(single)  # lockstep, fewer steps than one GPU
    everything = sorted(i for b in _ids(single) for i in b)
    for _epoch in range(2):
        a, b = _ids(rank0), _ids(rank1)
        assert len(a) == len(b) == len(rank0)
        flat_a, flat_b = [i for x in a for i in x], [i for x in b for i in x]
        if buckets is None:  # 16 images, global batch 4: every slice is whole and disjoint
            assert not set(flat_a) & set(flat_b)
            assert all(len(x) == 2 for x in a + b)
        assert sorted(set(flat_a) | set(flat_b)) == everything
        for x, y in zip(a, b, strict=True):  # a global batch of 1 is the only overlap
            assert x and y and (not set(x) & set(y) or x == y and len(x) == 1)
    assert rank0.epoch == rank1.epoch == 2


def test_epochs_are_reshuffled_across_ranks_deterministically(tmp_path: Path) -> None:
    rank0, _ = _loaders(tmp_path, 2)
    again, _ = _loaders(tmp_path, 2)
    e0, e1 = _ids(rank0), _ids(rank0)
    assert e0 != e1 and _ids(again) == e0


def test_saved_position_resumes_every_rank(tmp_path: Path) -> None:
    ranks = _loaders(tmp_path, 2)
    reference = [_ids(r) for r in _loaders(tmp_path, 2)]
    it = iter(ranks[0])
    next(it), next(it)
    state = ranks[0].state_dict()  # the main process saves; every rank restores it
    for rank, expected in enumerate(reference):
        fresh = _loaders(tmp_path, 2)[rank]
        fresh.load_state_dict(state)
        assert _ids(fresh) == expected[2:]
    with pytest.raises(ResumeMismatchError):  # positions count global batches
        _loaders(tmp_path, 1)[0].load_state_dict(state)


def test_short_tail_batch_still_gives_every_rank_an_example() -> None:
    bucket_of = [0] * 9  # world 4 × batch 2: global batches of 8 and a tail of 1
    ranks = [BucketBatchSampler(bucket_of, 2, seed=0, num_replicas=4, rank=r) for r in range(4)]
    plans = [s.batches(0) for s in ranks]
    assert [len(p) for p in plans] == [2, 2, 2, 2]
    covered = {i for p in plans for b in p for i in b}
    assert covered == set(range(9)) and all(b for p in plans for b in p)
    single = BucketBatchSampler(bucket_of, 2, seed=0)
    assert single.batches(0) == single.global_batches(0)  # one GPU: plan unchanged
    with pytest.raises(ValueError):
        BucketBatchSampler(bucket_of, 2, seed=0, num_replicas=2, rank=2)
