"""Multi-GPU data sharding: under ``accelerate launch`` each process's loader yields its own
disjoint slice of every global batch; together the ranks cover the epoch exactly once, in
lockstep (same number of batches), and one saved position resumes every rank.

The ranks are built side by side in this process (no multi-process training in tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from data_fixtures import BUCKET_SIZES, BUCKETS, lora_config, write_image_dir

from kubetune.errors import ResumeMismatchError
from runner.data import build_train_dataloader
from runner.data.buckets import BucketBatchSampler

SIZES = [*BUCKET_SIZES, (64, 66), (72, 72), (58, 58)]


def _loaders(  # type: ignore[type-arg]
    tmp_path: Path, world: int, batch: int = 2, seed: int = 3, **kw: object
) -> list:
    if not (tmp_path / "d").exists():
        write_image_dir(tmp_path / "d", SIZES)
    cfg = lora_config(
        {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")}, **kw
    )
    return [
        build_train_dataloader(
            cfg,
            seed=seed,
            batch_size=batch,
            device_is_cuda=False,
            num_processes=world,
            process_index=rank,
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
    assert state["examples"] == 8 and state["global_batch_size"] == 4
    # the same global batch split otherwise (1 process × 4): exactly the same batches
    whole = _loaders(tmp_path, 1, batch=4)[0]
    assert whole.sampler.global_batch_size == 4
    reference_whole = _ids(_loaders(tmp_path, 1, batch=4)[0])
    whole.load_state_dict(state)
    assert _ids(whole) == reference_whole[2:]
    # another global batch size (1 × 2): after the 8 examples seen, order not kept
    other = _loaders(tmp_path, 1)[0]
    other.load_state_dict(state)
    assert (other.sampler.epoch, other.sampler.position) == (0, 4)
    with pytest.raises(ResumeMismatchError):  # another seed: another data order
        _loaders(tmp_path, 1, seed=4)[0].load_state_dict(state)


def test_slots_place_each_rank_in_its_global_batch() -> None:
    """Rows are each example's place in its global batch; the shares make the mean over
    processes of each one's mean loss the mean over the global batch (a tail shorter than
    the number of processes: the copies weigh 0)."""
    bucket_of = [0] * 9  # world 4 × batch 2: global batches of 8 and a tail of 1
    ranks = [BucketBatchSampler(bucket_of, 2, seed=0, num_replicas=4, rank=r) for r in range(4)]
    full = ranks[0].global_batches(0)
    big = 0 if len(full[0]) == 8 else 1
    for r, sampler in enumerate(ranks):
        slots = sampler.slots(0, big)
        assert slots.rows == [r, r + 4] and slots.size == 8
        assert slots.indices == [full[big][r], full[big][r + 4]] == sampler.batches(0)[big]
        assert slots.shares() == [1.0, 1.0]  # 4 processes × 2 / 8
        tail = sampler.slots(0, 1 - big)
        assert tail.rows == [0] and tail.size == 1
        assert tail.shares() == ([4.0] if r == 0 else [0.0])
    uneven = [BucketBatchSampler([0] * 3, 2, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    shares = [s.slots(0, 0).shares() for s in uneven]  # 3 examples: rank 0 has 2, rank 1 one
    assert shares == [[4 / 3, 4 / 3], [2 / 3]]
    # mean over ranks of (mean over own rows of share × loss) == mean over the batch
    assert (sum(shares[0]) / 2 + sum(shares[1]) / 1) / 2 == 1.0


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
