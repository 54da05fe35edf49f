"""Self-healing resume: a newest checkpoint that fails its manifest check is set aside (never
deleted) and resume falls back to the newest valid one — on a local dir and on SeaweedFS."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from kubetune import layout
from kubetune.checkpoint.manifest import NoValidCheckpoint
from kubetune.checkpoint.publish import CheckpointManager
from kubetune.errors import StorageError
from kubetune.storage import ObjectStore, open_store


def _folder(root: Path, step: int) -> Path:
    out = root / f"src-{step}"
    (out / "nested").mkdir(parents=True, exist_ok=True)
    (out / "weights.bin").write_bytes(bytes([step % 251]) * 4096)
    (out / "nested" / "state.bin").write_bytes(b"state-%d" % step)
    return out


def _flip_bytes(store: ObjectStore, step: int) -> None:
    key = layout.checkpoint_key(step, "weights.bin")
    data = bytearray(store.get_bytes(key))
    data[100:104] = bytes(b ^ 0xFF for b in data[100:104])
    store.put_bytes(key, bytes(data))


def _truncate(store: ObjectStore, step: int) -> None:
    key = layout.checkpoint_key(step, "weights.bin")
    store.put_bytes(key, store.get_bytes(key)[:1000])


def _drop_object(store: ObjectStore, step: int) -> None:
    store.delete([layout.checkpoint_key(step, "nested/state.bin")])


def _garble_manifest(store: ObjectStore, step: int) -> None:
    store.put_bytes(layout.manifest_key(step), b'{"step": ')


DAMAGE: dict[str, Callable[[ObjectStore, int], None]] = {
    "corrupt": _flip_bytes,
    "truncated": _truncate,
    "missing-object": _drop_object,
    "garbled-manifest": _garble_manifest,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_falls_back_to_previous(store_uri: str, tmp_path: Path, damage: str) -> None:
    store = open_store(store_uri)
    manager = CheckpointManager(store, max_checkpoints=3)
    for step in (2, 4, 6):
        manager.save(step, _folder(tmp_path, step))
    original = {o.key: store.get_bytes(o.key) for o in store.list(layout.checkpoint_key(6) + "/")}
    DAMAGE[damage](store, 6)
    damaged = {o.key: store.get_bytes(o.key) for o in store.list(layout.checkpoint_key(6) + "/")}

    restored = manager.restore_newest_valid(tmp_path / "restore")

    assert restored is not None and restored.step == 4
    assert (restored.folder / "weights.bin").read_bytes() == bytes([4]) * 4096
    assert manager.list_complete() == [2, 4]
    [aside] = restored.set_aside
    assert aside.step == 6 and aside.moved_to.startswith(layout.SET_ASIDE + "/step-000006.")
    assert "step-000006" in aside.reason
    moved = {o.key[len(aside.moved_to) + 1 :]: store.get_bytes(o.key)
             for o in store.list(aside.moved_to + "/")}  # fmt: skip
    kept = {k[len(layout.checkpoint_key(6)) + 1 :]: v for k, v in damaged.items()}
    assert {k: v for k, v in moved.items() if k != "set-aside.json"} == kept  # nothing lost
    assert json.loads(moved["set-aside.json"])["reason"] == aside.reason
    assert not any(store.list(layout.checkpoint_key(6) + "/"))
    assert len(original) >= 3
    # the next save of step 6 does not touch what was set aside
    manager.save(6, _folder(tmp_path, 6))
    assert manager.list_complete() == [2, 4, 6]
    assert {o.key for o in store.list(aside.moved_to + "/")} == {
        f"{aside.moved_to}/{k}" for k in moved
    }


def test_every_checkpoint_damaged_fails_naming_them_and_moves_nothing(
    store_uri: str, tmp_path: Path
) -> None:
    store = open_store(store_uri)
    manager = CheckpointManager(store, max_checkpoints=3)
    for step in (1, 2):
        manager.save(step, _folder(tmp_path, step))
        _flip_bytes(store, step)
    with pytest.raises(NoValidCheckpoint) as info:
        manager.restore_newest_valid(tmp_path / "restore")
    message = str(info.value)
    assert "step-000001" in message and "step-000002" in message and "--force-restart" in message
    assert manager.list_complete() == [1, 2]
    assert not any(store.list(layout.SET_ASIDE + "/"))


def test_no_checkpoint_is_none(store_uri: str, tmp_path: Path) -> None:
    manager = CheckpointManager(open_store(store_uri), max_checkpoints=3)
    assert manager.restore_newest_valid(tmp_path / "restore") is None


@pytest.mark.slow
def test_run_resumes_past_a_corrupt_newest_checkpoint(
    tiny_sd_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's reproduction: four bytes flipped in the newest checkpoint's weights (its
    manifest intact) → the rerun resumes from the previous one, says so, and completes."""
    from train_support import make_config, train, write_dataset

    data = write_dataset(tmp_path / "images", n=2)
    out = tmp_path / "run"
    first = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=4, save_every_n_steps=2)
    train(first)
    weights = out / layout.checkpoint_key(4, "trainable.safetensors")
    raw = bytearray(weights.read_bytes())
    raw[-8:-4] = bytes(b ^ 0xFF for b in raw[-8:-4])
    weights.write_bytes(bytes(raw))

    longer = make_config("SD_LORA", tiny_sd_dir, data, out, max_train_steps=6, save_every_n_steps=2)
    with caplog.at_level("INFO"):
        result = train(longer)

    assert result.step == 6
    assert "resumed from checkpoint step-000002" in caplog.text
    assert "set aside step-000004" in caplog.text
    record = layout.ProgressRecord.from_bytes((out / layout.PROGRESS_KEY).read_bytes())
    assert record.state == "completed" and record.resumed_from == 2
    assert [a.step for a in record.set_aside] == [4]
    moved = out / record.set_aside[0].moved_to / "trainable.safetensors"
    assert moved.read_bytes() == bytes(raw)  # kept as found, never deleted


class _DeletesFail:
    """A real store whose deletes fail (fault injection: a store that refuses deletes cannot
    be configured on SeaweedFS per call). Everything else is the real store."""

    def __init__(self, store: ObjectStore) -> None:
        self.inner, self.uri, self.failing = store, store.uri, True

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def delete(self, keys: object) -> None:
        if self.failing:
            raise StorageError("delete refused (injected)")
        self.inner.delete(keys)  # type: ignore[arg-type]


def test_prune_failure_is_logged_and_the_run_continues(
    store_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _DeletesFail(open_store(store_uri))
    manager = CheckpointManager(store, max_checkpoints=1)  # type: ignore[arg-type]
    with caplog.at_level("WARNING"):
        for step in (1, 2):
            manager.save_async(step, _folder(tmp_path, step))
        manager.wait()  # no error: the checkpoints were published, only pruning failed
    assert manager.list_complete() == [1, 2]
    assert "pruning checkpoints failed" in caplog.text and "injected" in caplog.text
    store.failing = False
    manager.save(3, _folder(tmp_path, 3))
    assert manager.list_complete() == [3]
