"""Retry policy lives in one layer, ``kubetune.storage.run_store.RunStore``: a transient failure is
retried exactly ``RetryPolicy.attempts`` times in all, never multiplied by the layers above
(the checkpoint publisher) or beside it.

``_Flaky`` is a fault-injecting wrapper over a real ``LocalStore`` (the injected error is
the ``StorageError`` a store raises once its transport gave up); it counts every attempt.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.errors import StorageError
from kubetune.storage import LocalStore, ObjectInfo
from kubetune.storage.run_store import RetryPolicy, RunStore

NO_WAIT = RetryPolicy(attempts=3, backoff_s=0.0, backoff_max_s=0.0)


class _Flaky:
    """A LocalStore whose writes to keys containing ``target`` fail ``failures`` times."""

    def __init__(self, root: Path, target: str, failures: int) -> None:
        self.inner, self.uri = LocalStore(root), str(root)
        self.target, self.failures = target, failures
        self.attempts: Counter[str] = Counter()

    def _maybe_fail(self, key: str) -> None:
        if self.target in key:
            self.attempts[key] += 1
            if self.attempts[key] <= self.failures:
                raise StorageError(f"write {key} failed (injected)")

    def url(self, key: str) -> str:
        return self.inner.url(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._maybe_fail(key)
        self.inner.put_bytes(key, data)

    def put_file(self, key: str, path: str | Path) -> None:
        self._maybe_fail(key)
        self.inner.put_file(key, path)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def get_file(self, key: str, path: str | Path) -> None:
        self.inner.get_file(key, path)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, keys: Iterable[str]) -> None:
        self.inner.delete(keys)


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 100)
    return folder


@pytest.mark.parametrize("target", ["weights.bin", "manifest.json"])
def test_a_transient_write_failure_is_retried_by_the_run_store_once_over(
    tmp_path: Path, target: str
) -> None:
    flaky = _Flaky(tmp_path / "out", target, failures=2)
    manager = CheckpointManager(RunStore(flaky, retry=NO_WAIT), max_checkpoints=None)
    manager.save(1, _folder(tmp_path))
    assert manager.list_complete() == [1]
    assert list(flaky.attempts.values()) == [3]  # two failures, then the write that landed


def test_retries_are_not_multiplied_when_the_store_stays_down(tmp_path: Path) -> None:
    flaky = _Flaky(tmp_path / "out", "weights.bin", failures=10**6)
    manager = CheckpointManager(RunStore(flaky, retry=NO_WAIT), max_checkpoints=None)
    with pytest.raises(StorageError, match="injected"):
        manager.save(1, _folder(tmp_path))
    assert list(flaky.attempts.values()) == [NO_WAIT.attempts]  # 3 in all, not 3 × 3
    assert manager.list_complete() == []


def test_the_publisher_adds_no_retries_of_its_own(tmp_path: Path) -> None:
    flaky = _Flaky(tmp_path / "out", "weights.bin", failures=1)
    manager = CheckpointManager(flaky, max_checkpoints=None)  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="injected"):
        manager.save(1, _folder(tmp_path))
    assert list(flaky.attempts.values()) == [1]


def test_the_default_policy_is_the_documented_one() -> None:
    policy = RetryPolicy()
    assert (policy.attempts, policy.backoff_s, policy.backoff_max_s) == (5, 0.5, 10.0)
    doc = " ".join((Path(__file__).parents[2] / "docs" / "architecture.md").read_text().split())
    assert "at most 5 × 5 = 25 HTTP requests" in doc
