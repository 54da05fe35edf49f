"""kubetune.checkpoint.publish against a local directory and a real SeaweedFS server (same
suite)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from faultproxy import FaultProxy

from kubetune.checkpoint.manifest import Manifest
from kubetune.checkpoint.publish import CheckpointManager
from kubetune.errors import StorageError, StorageUserError
from kubetune.storage import ObjectStore, open_store
from kubetune.storage.run_store import RetryPolicy, RunStore


def _write_checkpoint(root: Path, step: int, sizes: tuple[int, ...] = (1000, 20_000, 0)) -> Path:
    """A local checkpoint folder with a nested file; contents depend on the step."""
    out = root / f"local-{step}"
    (out / "nested").mkdir(parents=True, exist_ok=True)
    rng = __import__("random").Random(step)
    for i, size in enumerate(sizes):
        name = f"nested/part-{i}.bin" if i == 1 else f"part-{i}.bin"
        (out / name).write_bytes(rng.randbytes(size))
    return out


def _steps_in_store(store: ObjectStore) -> set[str]:
    return {o.key.split("/")[1] for o in store.list("checkpoints/")}


def _proxied(proxy: FaultProxy, uri: str, **options: object) -> ObjectStore:
    return open_store(uri, SimpleNamespace(endpoint_url=proxy.endpoint), **options)


def test_save_restore_round_trip(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    manager = CheckpointManager(store, max_checkpoints=3)
    assert manager.latest() is None
    src = _write_checkpoint(tmp_path, 7)
    manager.save_async(7, src, meta={"config_hash": "abc", "type": "SD_LORA"})
    manager.wait()
    assert manager.latest() == 7 and manager.list_complete() == [7]
    manifest = manager.read_manifest(7)
    assert isinstance(manifest, Manifest) and manifest.step == 7
    assert manifest.meta == {"config_hash": "abc", "type": "SD_LORA"}
    expected = {
        p.relative_to(src).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file()
    }
    assert {f.key: f.sha256 for f in manifest.files} == expected
    raw = json.loads(store.get_bytes("checkpoints/step-000007/manifest.json"))
    assert raw["step"] == 7 and raw["created"] and len(raw["files"]) == 3
    dest = tmp_path / "restored"
    assert manager.restore(7, dest).step == 7
    for key in expected:
        assert (dest / key).read_bytes() == (src / key).read_bytes()
    manager.wait()


@pytest.mark.parametrize("limit", [1, 2, 4])
def test_pruning_keeps_exactly_the_newest(store_uri: str, tmp_path: Path, limit: int) -> None:
    store = open_store(store_uri)
    store.put_bytes("validation/step-000010/grid.png", b"png")
    store.put_bytes("checkpoints/notes.txt", b"not a checkpoint")
    store.put_bytes("checkpoints-other/step-000010/manifest.json", b"{}")
    manager = CheckpointManager(store, max_checkpoints=limit)
    steps = [10, 20, 30, 40, 50]
    for step in steps:
        manager.save_async(step, _write_checkpoint(tmp_path, step))
    manager.wait()
    kept = steps[-limit:]
    assert manager.list_complete() == kept
    assert _steps_in_store(store) == {f"step-{s:06d}" for s in kept} | {"notes.txt"}
    for key in ("validation/step-000010/grid.png", "checkpoints/notes.txt",
                "checkpoints-other/step-000010/manifest.json"):  # fmt: skip
        assert store.exists(key), key


def test_no_limit_keeps_everything(store_uri: str, tmp_path: Path) -> None:
    manager = CheckpointManager(open_store(store_uri), max_checkpoints=None)
    for step in (1, 2, 3):
        manager.save(step, _write_checkpoint(tmp_path, step))
    assert manager.list_complete() == [1, 2, 3]


def test_manifest_less_checkpoints_are_invisible_and_cleaned_up(
    store_uri: str, tmp_path: Path
) -> None:
    store = open_store(store_uri)
    manager = CheckpointManager(store, max_checkpoints=5)
    manager.save(10, _write_checkpoint(tmp_path, 10))
    store.put_bytes("checkpoints/step-000015/part-0.bin", b"half an upload")
    store.put_bytes("checkpoints/step-000900/part-0.bin", b"from a crashed later attempt")
    assert manager.latest() == 10 and manager.list_complete() == [10]
    with pytest.raises(FileNotFoundError):
        manager.restore(15, tmp_path / "r15")
    manager.save(20, _write_checkpoint(tmp_path, 20))
    assert not store.exists("checkpoints/step-000015/part-0.bin")  # older than newest complete
    assert store.exists("checkpoints/step-000900/part-0.bin")  # newer: maybe in progress
    assert manager.list_complete() == [10, 20]


def test_resaving_a_step_replaces_it_consistently(store_uri: str, tmp_path: Path) -> None:
    manager = CheckpointManager(open_store(store_uri), max_checkpoints=2)
    manager.save(5, _write_checkpoint(tmp_path, 5))
    other = _write_checkpoint(tmp_path, 6, sizes=(10, 10))
    manager.save(5, other)
    restored = tmp_path / "r"
    manager.restore(5, restored)
    assert (restored / "part-0.bin").read_bytes() == (other / "part-0.bin").read_bytes()
    assert len(manager.read_manifest(5).files) == 2


def test_restore_detects_corruption(store_uri: str, tmp_path: Path) -> None:
    store = open_store(store_uri)
    manager = CheckpointManager(store, max_checkpoints=2)
    manager.save(3, _write_checkpoint(tmp_path, 3))
    store.put_bytes("checkpoints/step-000003/part-0.bin", b"x" * 1000)  # same size, other bytes
    with pytest.raises(StorageError, match="part-0.bin"):
        manager.restore(3, tmp_path / "r1")
    store.put_bytes("checkpoints/step-000003/part-0.bin", b"short")
    with pytest.raises(StorageError, match="part-0.bin"):
        manager.restore(3, tmp_path / "r2")


def test_back_pressure_one_upload_in_flight(store_uri: str, tmp_path: Path) -> None:
    manager = CheckpointManager(open_store(store_uri), max_checkpoints=10)
    for step in (1, 2, 3):
        manager.save_async(step, _write_checkpoint(tmp_path, step, sizes=(300_000,)))
        # the previous checkpoint is complete before the next one is accepted
        assert manager.list_complete()[-1:] in ([], [step - 1], [step])
        assert set(manager.list_complete()) >= set(range(1, step))
    manager.wait()
    assert manager.list_complete() == [1, 2, 3]


def test_background_errors_surface_in_wait(store_uri: str, tmp_path: Path) -> None:
    manager = CheckpointManager(open_store(store_uri), max_checkpoints=2)
    manager.save_async(1, tmp_path / "no-such-dir")
    with pytest.raises(FileNotFoundError):
        manager.wait()
    manager.wait()  # reported once
    manager.save(2, _write_checkpoint(tmp_path, 2))
    assert manager.list_complete() == [2]


def test_concurrent_reader_never_sees_an_incomplete_checkpoint(
    store_uri: str, tmp_path: Path
) -> None:
    store = open_store(store_uri)
    manager = CheckpointManager(store, max_checkpoints=2)
    reader = CheckpointManager(store, max_checkpoints=None)
    stop, violations, seen = threading.Event(), [], set()

    def poll() -> None:
        while not stop.is_set():
            for step in reader.list_complete():
                try:
                    manifest = reader.read_manifest(step)
                except FileNotFoundError:
                    continue  # pruned between listing and reading
                sizes = {o.key: o.size for o in store.list(f"checkpoints/step-{step:06d}/")}
                for f in manifest.files:
                    key = f"checkpoints/step-{step:06d}/{f.key}"
                    if sizes.get(key) != f.size and store.exists(
                        f"checkpoints/step-{step:06d}/manifest.json"
                    ):
                        violations.append((step, f.key, sizes.get(key), f.size))
                seen.add(step)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        for step in range(1, 9):
            manager.save_async(step, _write_checkpoint(tmp_path, step, (50_000, 80_000, 10)))
        manager.wait()
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not violations
    assert len(seen) >= 2 and manager.list_complete() == [7, 8]


# --- S3 fault injection ----------------------------------------------------------------------


def test_transient_faults_lose_nothing(
    fault_proxy: FaultProxy, s3_uri: str, tmp_path: Path
) -> None:
    store = _proxied(fault_proxy, s3_uri, multipart_threshold=5 * 2**20,
                     multipart_chunksize=5 * 2**20, max_attempts=2)  # fmt: skip
    manager = CheckpointManager(
        RunStore(store, retry=RetryPolicy(backoff_s=0.05)), max_checkpoints=2
    )
    sources = {}
    for step, faults in enumerate([("500", "503"), ("reset", "cut_request"), ("cut_response",)]):
        for fault in faults:
            fault_proxy.inject(fault, 2)
        sources[step] = _write_checkpoint(tmp_path, step, (6 * 2**20, 30_000))
        manager.save_async(step, sources[step])
    manager.wait()
    assert fault_proxy.pending() == 0
    assert manager.list_complete() == [1, 2]
    for step in (1, 2):
        fault_proxy.inject("cut_response", 1, method="GET")
        fault_proxy.inject("reset", 1, method="GET")
        dest = tmp_path / f"restored-{step}"
        manager.restore(step, dest)
        for p in sources[step].rglob("*.bin"):
            assert (dest / p.relative_to(sources[step])).read_bytes() == p.read_bytes()


@pytest.mark.slow
def test_store_down_for_a_while_is_outlasted(
    fault_proxy: FaultProxy, s3_uri: str, tmp_path: Path
) -> None:
    store = _proxied(fault_proxy, s3_uri, max_attempts=2)
    manager = CheckpointManager(RunStore(store, retry=RetryPolicy(6, 0.5)), max_checkpoints=1)
    manager.save(1, _write_checkpoint(tmp_path, 1))
    fault_proxy.down_for(1.5)
    manager.save(2, _write_checkpoint(tmp_path, 2))
    assert manager.list_complete() == [2]


def test_a_failed_upload_publishes_nothing(
    fault_proxy: FaultProxy, s3_uri: str, tmp_path: Path
) -> None:
    store = _proxied(fault_proxy, s3_uri, max_attempts=1)
    manager = CheckpointManager(RunStore(store, retry=RetryPolicy(2, 0.01)), max_checkpoints=3)
    manager.save(1, _write_checkpoint(tmp_path, 1))
    fault_proxy.inject("500", 5, path_contains="manifest.json", method="PUT")
    manager.save_async(2, _write_checkpoint(tmp_path, 2))
    with pytest.raises(StorageError):
        manager.wait()
    assert manager.latest() == 1
    assert store.exists("checkpoints/step-000002/part-0.bin")  # leftover, invisible
    fault_proxy.clear()
    manager.save(3, _write_checkpoint(tmp_path, 3))
    assert manager.list_complete() == [1, 3]
    assert not any(o.key.startswith("checkpoints/step-000002/") for o in store.list())


def test_permanent_errors_fail_fast_without_retrying(s3_env: object, tmp_path: Path) -> None:
    slow = RunStore(open_store("s3://missing-bucket-kt/run"), retry=RetryPolicy(5, 5.0))
    manager = CheckpointManager(slow, max_checkpoints=1)
    start = time.monotonic()
    manager.save_async(1, _write_checkpoint(tmp_path, 1))
    with pytest.raises(StorageUserError, match="missing-bucket-kt"):
        manager.wait(timeout=20.0)
    assert time.monotonic() - start < 4
