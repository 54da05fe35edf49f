"""The streaming bucket order (`aspect_ratio_buckets.order: streaming`): one-bucket batches,
every example once per epoch, seeded; a batch needs only the sizes scanned up to it; it
waits for a size not read yet and fails with the checks' error; resumes exactly, also on
another split over processes; its config rules. Real sizes fed as the checks would."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path

import pytest

from kubetune.config.data import AspectRatioBucketConfig
from kubetune.dataset.buckets import build_buckets, closest_bucket, scan_order
from kubetune.dataset.size_feed import SizeFeed
from kubetune.errors import ConfigError, DataError, ResumeMismatchError
from runner.data.buckets import BucketBatchSampler
from runner.data.streaming import StreamingBucketSampler, StreamTargets

BUCKET_CFG = AspectRatioBucketConfig(
    target_resolution=64, start_dim=32, end_dim=128, divisible_by=16
)
BUCKETS = build_buckets(BUCKET_CFG)


def _sizes(n: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.choice([48, 64, 96, 120]), rng.choice([40, 64, 80, 128])) for _ in range(n)]


def _sampler(feed: SizeFeed, batch: int = 3, seed: int = 5, **kw: int) -> StreamingBucketSampler:
    return StreamingBucketSampler(StreamTargets(feed, BUCKETS), batch, seed, **kw)


def _full(sizes: list[tuple[int, int]]) -> SizeFeed:
    feed = SizeFeed(len(sizes))
    feed.fill(sizes)
    return feed


class StrictFeed(SizeFeed):
    """A feed that refuses (instead of waiting) to give a size it has not been given."""

    def get(self, i: int) -> tuple[int, int]:
        size = self.known(i)
        assert size is not None, f"example {i}'s size was asked for before it was read"
        return size


def test_an_epoch_is_every_example_once_in_one_bucket_batches() -> None:
    sizes = _sizes(200)
    sampler = _sampler(_full(sizes), batch=4)
    bucket = [closest_bucket(s, BUCKETS) for s in sizes]
    epochs = []
    for epoch in range(2):
        batches = sampler.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(200))
        assert all(len({bucket[i] for i in b}) == 1 for b in batches)
        short = Counter(bucket[b[0]] for b in batches if len(b) < 4)
        assert all(n == 1 for n in short.values())  # at most one partial batch per bucket
        full = [b for b in batches if len(b) == 4]
        assert batches[: len(full)] == full  # the partial batches end the epoch
        epochs.append(batches)
    assert epochs[0] != epochs[1]
    assert _sampler(_full(sizes), batch=4).batches(0) == epochs[0]  # seeded
    assert _sampler(_full(sizes), batch=4, seed=6).batches(0) != epochs[0]
    assert len(sampler) == len(epochs[0]) and sampler.estimated_len() == len(sampler)


def test_the_first_batch_needs_only_the_sizes_scanned_up_to_it() -> None:
    n, seed = 10_000, 5
    sizes = _sizes(n)
    feed = StrictFeed(n)
    wanted: list[tuple[int, int]] = []
    feed.on_want = lambda s, e: wanted.append((s, e))
    first = scan_order(n, seed, 0)[:60]
    feed.put((i, *sizes[i]) for i in first)
    sampler = _sampler(feed, batch=2, seed=seed)
    batch = next(sampler.remaining())
    assert wanted == [(seed, 0)]  # the checks were asked to read this epoch's order first
    assert len(batch) == 2 and all(i in first for i, _epoch, _hw in batch)
    first_bucket = BUCKETS[closest_bucket(sizes[batch[0][0]], BUCKETS)]
    assert {hw for _i, _epoch, hw in batch} == {first_bucket}
    assert sampler.estimated_len() == n // 2  # the epoch's length is not known yet


def test_a_batch_waits_for_its_sizes_and_fails_with_the_checks_error() -> None:
    sizes = _sizes(50)
    feed = SizeFeed(50)
    got: list[object] = []
    thread = threading.Thread(target=lambda: got.append(next(_sampler(feed).remaining())))
    thread.start()
    thread.join(0.3)
    assert thread.is_alive() and not got  # nothing read yet: it waits
    feed.fill(sizes)
    thread.join(10)
    assert got and len(got[0]) == 3  # type: ignore[arg-type]

    failing = SizeFeed(50)
    failing.put([(0, 64, 64)])
    error = DataError("data/pic-003.jpg: not an image")
    failing.fail(error)
    with pytest.raises(DataError, match="pic-003"):
        next(_sampler(failing).remaining())


def test_resumes_exactly_also_on_another_split_over_processes() -> None:
    sizes = _sizes(120)
    run = _sampler(_full(sizes), batch=4)
    for _ in range(5):
        run.advance()
    state = run.state_dict()
    rest = list(run.remaining())

    again = _sampler(_full(sizes), batch=4)
    again.load_state_dict(state)
    assert list(again.remaining()) == rest

    halves = [_sampler(_full(sizes), batch=2, num_replicas=2, rank=r) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    pairs = zip(*(h.remaining() for h in halves), strict=True)
    joined = [sorted(set(a + b)) for a, b in pairs]  # (a 1-example tail is on both ranks)
    assert joined == [sorted(batch) for batch in rest]


def test_a_state_of_the_other_order_or_dataset_is_refused() -> None:
    sizes = _sizes(40)
    invoke = BucketBatchSampler([closest_bucket(s, BUCKETS) for s in sizes], 4, seed=5)
    with pytest.raises(ResumeMismatchError):
        _sampler(_full(sizes), batch=4).load_state_dict(invoke.state_dict())
    state = StreamingBucketSampler(StreamTargets(_full(sizes), BUCKETS), 4, 5, identity="a")
    other = StreamingBucketSampler(StreamTargets(_full(sizes), BUCKETS), 4, 5, identity="b")
    with pytest.raises(ResumeMismatchError):
        other.load_state_dict(state.state_dict())


def test_order_defaults_to_invoke_and_streaming_refuses_what_needs_every_size() -> None:
    from kubetune.config.loader import parse_config

    assert BUCKET_CFG.order == "invoke"
    text = """
type: SD_LORA
model: runwayml/stable-diffusion-v1-5
base_output_dir: out
max_train_steps: 10
save_every_n_steps: 5
data_loader:
  type: IMAGE_CAPTION_SD_DATA_LOADER
  dataset: {type: IMAGE_CAPTION_JSONL_DATASET, jsonl_path: d.jsonl%s}
  aspect_ratio_buckets:
    {target_resolution: 64, start_dim: 32, end_dim: 128, divisible_by: 16, order: streaming}
"""
    assert parse_config(text % "").data_loader.aspect_ratio_buckets.order == "streaming"
    with pytest.raises(ConfigError) as err:
        parse_config(text % ", keep_in_memory: true")
    assert "data_loader.aspect_ratio_buckets.order" in str(err.value)
    assert "keep_in_memory" in str(err.value)


def test_the_loaders_first_batch_needs_only_the_sizes_scanned_up_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole loader (dataset, sampler, prefetch), built on a listed report whose feed
    has only the sizes of the scan up to the first batch: that batch comes (the prefetch
    waits for the next batches' sizes without holding it back), and closing the loader
    (a preempted run's exit) does not wait for sizes still to come."""
    from dataclasses import replace

    from data_fixtures import lora_config, write_image_dir

    import runner.data.prefetch
    from kubetune.dataset.preflight import preflight
    from runner.data import build_train_dataloader

    monkeypatch.setattr(runner.data.prefetch, "PREFETCH_STOP_WAIT_S", 0.2)
    n, seed = 40, 5
    write_image_dir(tmp_path / "d", _sizes(n, seed=3))
    streaming = {**BUCKET_CFG.model_dump(), "order": "streaming"}
    dataset = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")}
    cfg = lora_config(dataset, aspect_ratio_buckets=streaming)
    checked = preflight(cfg)
    feed = SizeFeed(n)
    _first_batch_sizes(feed, checked.sizes_hw, seed, batch=2)
    listed = replace(checked, sizes_hw=[], index=None, feed=feed)
    loader = build_train_dataloader(cfg, seed=seed, batch_size=2, device_is_cuda=False, data=listed)
    assert loader.estimated_len() == n // 2 and loader.bucket_counts() == {}
    batches = iter(loader)
    got: list[dict] = []
    taker = threading.Thread(target=lambda: got.append(next(batches)), daemon=True)
    taker.start()
    taker.join(10)
    assert got and len(got[0]["id"]) == 2 and got[0]["pixel_values"].shape[0] == 2
    closer = threading.Thread(target=batches.close, daemon=True)  # as a SIGTERM's exit does
    closer.start()
    closer.join(5)
    closed = not closer.is_alive()
    feed.fill(checked.sizes_hw)  # the rest arrive: the prefetch ends
    closer.join(10)
    assert closed, "closing the loader waited for sizes that had not arrived"


def _first_batch_sizes(feed: SizeFeed, sizes: list[tuple[int, int]], seed: int, batch: int) -> int:
    """Give ``feed`` the sizes of the scan up to the first full batch alone; how many."""
    held: Counter[int] = Counter()
    for k, i in enumerate(scan_order(len(sizes), seed, 0), start=1):
        feed.put([(i, *sizes[i])])
        held[closest_bucket(sizes[i], BUCKETS)] += 1
        if held.most_common(1)[0][1] == batch:
            return k
    raise AssertionError("no full batch")


def test_a_batch_is_taken_with_only_its_own_sizes() -> None:
    """Consuming the first batch (`advance`: is there another?) asks for no later size: the
    examples not scanned yet make one more batch, whatever their sizes."""
    sizes = _sizes(200)
    feed = StrictFeed(200)
    _first_batch_sizes(feed, sizes, seed=5, batch=3)
    sampler = _sampler(feed, batch=3, seed=5)
    assert len(next(sampler.remaining())) == 3
    sampler.advance()
    assert (sampler.epoch, sampler.position) == (0, 1)


def test_a_formed_batch_is_read_while_another_thread_waits_for_sizes() -> None:
    """The loader's prefetch waiting for a later batch's sizes does not hold back the
    training loop's look at the batch it already has."""
    from runner.data.streaming import StreamPlan

    sizes = _sizes(200)
    feed = SizeFeed(200)
    _first_batch_sizes(feed, sizes, seed=5, batch=3)
    targets = StreamTargets(feed, BUCKETS)
    plan = StreamPlan(scan_order(200, 5, 0), targets.bucket, 3)
    first = plan[0]
    waiting = threading.Thread(target=plan.has, args=(5,), daemon=True)
    waiting.start()
    got: list[list[int]] = []
    reader = threading.Thread(target=lambda: got.append(plan[0]), daemon=True)
    reader.start()
    reader.join(2)
    came = list(got)
    feed.fill(sizes)  # let the waiting thread end
    waiting.join(10)
    assert came == [first]


def test_an_undecodable_example_is_replaced_alike_whatever_sizes_have_arrived(
    tmp_path: Path,
) -> None:
    """An image whose header reads but whose data does not decode, alone in its batch: the
    example taken in its place is the same whether the other sizes have arrived or not
    (a loader worker holds the sizes known when it started), so a resumed run or another
    rank takes the same batch. It is cropped to the bad example's bucket."""
    from dataclasses import replace

    from data_fixtures import lora_config, write_image_dir

    from kubetune.dataset.preflight import preflight
    from runner.data import build_train_dataloader

    n = 12
    write_image_dir(tmp_path / "d", _sizes(n, seed=3))
    bad = tmp_path / "d" / "img-004.png"
    bad.write_bytes(bad.read_bytes()[:60])  # the header (IHDR) is whole, the pixels are not
    streaming = {**BUCKET_CFG.model_dump(), "order": "streaming"}
    dataset = {"type": "IMAGE_CAPTION_DIR_DATASET", "dataset_dir": str(tmp_path / "d")}
    cfg = lora_config(dataset, aspect_ratio_buckets=streaming, max_bad_image_share=0.5)
    checked = preflight(cfg)
    target = BUCKETS[closest_bucket(checked.sizes_hw[4], BUCKETS)]
    taken = []
    for known in ([4], range(n)):
        feed = SizeFeed(n)
        feed.put((i, *checked.sizes_hw[i]) for i in known)
        listed = replace(checked, sizes_hw=[], index=None, feed=feed)
        loader = build_train_dataloader(cfg, seed=5, batch_size=1, device_is_cuda=False,
                                        data=listed)  # fmt: skip
        [item] = loader.dataset.__getitems__([(4, 0, target)])
        assert "img-004.png" in item["skipped"][0] and item["pixel_values"].shape[1:] == target
        taken.append(item["id"])
    assert taken[0] == taken[1]
