"""One header reader per run (`aspect_ratio_buckets.order: streaming`, several processes): the
sizes global rank 0's checks put in their `SizeFeed` are published, in order, to the run's
key-value store, and every rank's sampler takes them from there: rank 0's own (a mirror that
learns nothing before it is published) and the others' (which follow the published log).
The store is a real `torch.distributed.TCPStore` served in this process, each side with its
own client, as torchrun's ranks have; no fake."""

from __future__ import annotations

import pickle
import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from dp_support import free_port

from kubetune.dataset.size_feed import SizeFeed
from kubetune.errors import DataError, ProcessGroupError
from runner.data.size_relay import follow_sizes, publish_sizes

pytestmark = pytest.mark.timeout(60)
WAIT_S = 10.0


@pytest.fixture
def stores() -> tuple[dist.Store, dist.Store]:
    """Rank 0's and another rank's clients of one TCPStore (rank 0 serves it)."""
    port = free_port()
    timeout = timedelta(seconds=WAIT_S)
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=timeout)  # fmt: skip
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timeout)
    return server, client


def _get_all(feed: SizeFeed) -> list[tuple[int, int]]:
    return [feed.get(i) for i in range(len(feed))]


def test_every_rank_gets_rank_0s_sizes_in_the_order_it_read_them(
    stores: tuple[dist.Store, dist.Store],
) -> None:
    wanted: list[tuple[int, int]] = []
    source = SizeFeed(6, on_want=lambda seed, epoch: wanted.append((seed, epoch)))
    mirror = publish_sizes(source, stores[0])
    other = follow_sizes(6, stores[1])
    mirror.want(7, 0)  # the sampler's order reaches rank 0's header checks
    assert wanted == [(7, 0)]
    source.put([(4, 10, 20), (1, 30, 40)])
    assert other.get(4) == (10, 20) and mirror.get(1) == (30, 40)  # waits for them
    assert other.known(0) is None and not other.complete
    source.put([(0, 1, 2), (2, 3, 4)])
    source.fill([(1, 2), (30, 40), (3, 4), (5, 6), (10, 20), (7, 8)])  # the final report
    assert _get_all(other) == _get_all(mirror) == _get_all(source)
    deadline = time.monotonic() + WAIT_S
    while not (other.complete and mirror.complete) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert other.complete and mirror.complete
    assert other.arrived() == mirror.arrived() == source.arrived() == [4, 1, 0, 2, 3, 5]


def test_a_checks_failure_reaches_every_rank_after_the_sizes_read_before_it(
    stores: tuple[dist.Store, dist.Store],
) -> None:
    """Rank 0's checks fail part way (a storage error): every rank gets the sizes read
    before the failure, then the same one-line error for any size not read; rank 0's
    sampler learns of it no sooner than the others can."""
    source = SizeFeed(4)
    mirror = publish_sizes(source, stores[0])
    other = follow_sizes(4, stores[1])
    source.put([(2, 8, 8)])
    source.fail(DataError("s3://bucket/img-3.png: read failed", hint="check the storage"))
    with pytest.raises(DataError):
        mirror.get(0)
    assert pickle.loads(stores[1].get("1"))[0] == "failed"  # in the store before rank 0 knew
    for feed in (mirror, other):
        assert feed.get(2) == (8, 8)
        with pytest.raises(DataError, match="img-3.png: read failed") as raised:
            feed.get(0)
        assert raised.value.hint == "check the storage"


def test_an_unpicklable_failure_still_reaches_every_rank_as_one_line(
    stores: tuple[dist.Store, dist.Store],
) -> None:
    class Odd(Exception):
        def __reduce__(self) -> tuple:
            raise TypeError("not picklable")

    source = SizeFeed(2)
    publish_sizes(source, stores[0])
    other = follow_sizes(2, stores[1])
    source.fail(Odd("the checks broke"))
    with pytest.raises(Exception, match="the checks broke"):
        other.get(0)


def test_a_rank_that_loses_the_store_fails_its_feed_instead_of_waiting() -> None:
    """The store goes away (its host died): the follower's feed fails with a lost-peer
    error at once, not a hang."""
    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=2))  # fmt: skip
    client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=2))
    other = follow_sizes(3, client)
    del server  # the serving side closes
    done = threading.Event()
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            other.get(0)
        except BaseException as err:  # noqa: BLE001 - checked below
            errors.append(err)
        done.set()

    threading.Thread(target=wait, daemon=True).start()
    assert done.wait(WAIT_S * 2), "the follower still waits for a store that is gone"
    assert isinstance(errors[0], ProcessGroupError), errors
    assert "image sizes" in str(errors[0])
