"""Looking for another rank's error after a lost peer is bounded even when the store hangs.

A node that vanishes without closing its sockets (power loss, a network partition) leaves the
store client waiting for replies up to the store's own timeout (minutes), and the store is
shared with other users of it, so its timeout cannot be lowered for this one look. A hung peer
cannot be produced reliably on one machine, so this test stands in for the store with an
object whose ``check`` blocks: a fake, said so here.
"""

from __future__ import annotations

import threading
import time

import pytest

from runner.training import distributed


class _HungStore:
    def __init__(self) -> None:
        self.release = threading.Event()

    def check(self, keys: list[str]) -> bool:
        self.release.wait(30)
        return False


def test_a_hung_store_gives_up_after_the_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    store = _HungStore()
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "run_store", lambda prefix: store)
    started = time.monotonic()
    try:
        assert distributed.peer_failure(wait_s=0.2) is None
        took = time.monotonic() - started
    finally:
        store.release.set()
    assert took < 5, f"peer_failure waited {took:.1f} s on a hung store"
