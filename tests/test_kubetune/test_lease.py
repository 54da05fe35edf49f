"""The run lease: one writer per run, on a local dir and on SeaweedFS (conditional writes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kubetune import layout
from kubetune.errors import EXIT_USER_ERROR, LeaseLost, RunLocked
from kubetune.storage import open_store
from kubetune.storage.lease import Lease, LeaseSettings
from kubetune.storage.run_store import RetryPolicy, RunStore

FAST = LeaseSettings(timeout_s=1.0, wait_s=0.0)


def test_conditional_primitives(store_uri: str) -> None:
    store = open_store(store_uri)
    assert store.create("lock", b"one") is True
    assert store.create("lock", b"two") is False
    data, tag = store.read_tagged("lock")
    assert data == b"one"
    assert store.replace_if("lock", b"three", tag) is True
    assert store.replace_if("lock", b"four", tag) is False  # stale tag
    assert store.get_bytes("lock") == b"three"
    assert store.delete_if("lock", tag) is False
    data, tag = store.read_tagged("lock")
    assert store.delete_if("lock", tag) is True and not store.exists("lock")
    with pytest.raises(FileNotFoundError):
        store.read_tagged("lock")
    assert store.replace_if("lock", b"x", tag) is False


def test_concurrent_creates_have_one_winner(store_uri: str) -> None:
    store = open_store(store_uri)
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait(timeout=10)
        if store.create("race", str(i).encode()):
            wins.append(i)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(wins) == 1 and store.get_bytes("race") == str(wins[0]).encode()


def test_second_runner_is_refused_naming_the_holder(store_uri: str) -> None:
    store = open_store(store_uri)
    first = Lease(store, FAST, holder="pod-a")
    first.acquire()
    try:
        with pytest.raises(RunLocked) as info:
            Lease(store, FAST, holder="pod-b").acquire()
        assert info.value.exit_code == EXIT_USER_ERROR
        message = str(info.value)
        assert "pod-a" in message and "since" in message and "\n" not in message
        record = json.loads(store.get_bytes(layout.LEASE_KEY))
        assert record["holder"] == "pod-a"
    finally:
        first.release()
    assert not store.exists(layout.LEASE_KEY)
    second = Lease(store, FAST, holder="pod-b")
    second.acquire()  # free again after release
    second.release()


def test_heartbeat_keeps_a_live_lease(store_uri: str) -> None:
    store = open_store(store_uri)
    with Lease(store, LeaseSettings(timeout_s=0.6, wait_s=0.0), holder="pod-a") as lease:
        time.sleep(1.5)  # more than the timeout: only the heartbeat keeps it
        with pytest.raises(RunLocked):
            Lease(store, LeaseSettings(timeout_s=0.6, wait_s=0.0), holder="pod-b").acquire()
        lease.check()


def test_waiting_runner_gets_the_lease_once_released(store_uri: str) -> None:
    store = open_store(store_uri)
    first = Lease(store, FAST, holder="pod-a")
    first.acquire()
    threading.Timer(0.5, first.release).start()
    second = Lease(store, LeaseSettings(timeout_s=1.0, wait_s=20.0), holder="pod-b")
    second.acquire()
    assert json.loads(store.get_bytes(layout.LEASE_KEY))["holder"] == "pod-b"
    second.release()


def test_stale_lease_is_taken_over_and_logged(
    store_uri: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(store_uri)
    dead = Lease(store, FAST, holder="pod-dead")
    dead.acquire(heartbeat=False)  # a killed pod: never renews, never releases
    time.sleep(1.2)
    with caplog.at_level("WARNING"):
        new = Lease(store, FAST, holder="pod-new")
        new.acquire()
    assert "took over the run lease from pod-dead" in caplog.text
    assert json.loads(store.get_bytes(layout.LEASE_KEY))["holder"] == "pod-new"
    with pytest.raises(LeaseLost, match="pod-new"):
        dead.check()  # the old holder finds out on its next write
    new.release()


def test_lost_lease_stops_the_old_writer(store_uri: str, tmp_path: Path) -> None:
    """A writer whose lease was taken over refuses every further write, checkpoints included."""
    from kubetune.checkpoint.publish import CheckpointManager

    store = open_store(store_uri)
    old = Lease(store, LeaseSettings(timeout_s=0.5, wait_s=0.0), holder="pod-old")
    old.acquire(heartbeat=False)
    guarded = RunStore(store, guard=old.check, retry=RetryPolicy(attempts=1))
    guarded.put_bytes("progress.json", b"{}")
    time.sleep(0.8)
    new = Lease(store, LeaseSettings(timeout_s=0.5, wait_s=0.0), holder="pod-new")
    new.acquire()
    try:
        with pytest.raises(LeaseLost):
            guarded.put_bytes("progress.json", b'{"step": 9}')
        folder = tmp_path / "ckpt"
        folder.mkdir()
        (folder / "w.bin").write_bytes(b"w")
        manager = CheckpointManager(guarded, max_checkpoints=2)
        manager.save_async(5, folder)
        with pytest.raises(LeaseLost):
            manager.wait()
        assert not any(store.list("checkpoints/"))
        assert store.get_bytes("progress.json") == b"{}"
    finally:
        new.release()


def test_release_does_not_remove_someone_elses_lease(store_uri: str) -> None:
    store = open_store(store_uri)
    old = Lease(store, LeaseSettings(timeout_s=0.3, wait_s=0.0), holder="pod-old")
    old.acquire(heartbeat=False)
    time.sleep(0.5)
    new = Lease(store, LeaseSettings(timeout_s=0.3, wait_s=0.0), holder="pod-new")
    new.acquire()
    old.release()
    assert json.loads(store.get_bytes(layout.LEASE_KEY))["holder"] == "pod-new"
    new.release()


@pytest.mark.slow
def test_second_runner_process_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    """`python -m runner` on a run whose lease another runner holds: exit 2, one line naming
    the holder, nothing written (the holder here is this test, renewing its lease)."""
    import os
    import subprocess
    import sys

    from train_support import config_file, make_config, write_dataset

    out = tmp_path / "run"
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), write_dataset(tmp_path / "d", n=2),
                      out, max_train_steps=2, lease_wait_seconds=0)  # fmt: skip
    holder = Lease(open_store(str(out)), LeaseSettings(timeout_s=30, wait_s=0), holder="pod-a")
    with holder:
        repo = Path(__file__).resolve().parents[2]
        cli = subprocess.run(
            [sys.executable, "-m", "runner", str(config_file(cfg, tmp_path / "c.yaml"))],
            cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert cli.returncode == 2, cli.stderr[-2000:]
        last = cli.stderr.strip().splitlines()[-1]
        assert last.startswith("kubetune: error: another runner holds this run: pod-a (since ")
        assert [o.key for o in open_store(str(out)).list()] == [layout.LEASE_KEY]


def test_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A local run killed with SIGKILL (or a crashed laptop run) leaves a lease behind: the
    next run on the same host sees its process is gone and takes over without waiting for
    the timeout. The holder is a real process, killed for real."""
    uri = str(tmp_path / "run")
    code = (
        "import os, signal, sys\n"
        "from kubetune.storage.lease import Lease, LeaseSettings\n"
        "from kubetune.storage import open_store\n"
        "Lease(open_store(sys.argv[1]), LeaseSettings(timeout_s=600, wait_s=0)).acquire()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, uri], timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL
    store = open_store(uri)
    assert store.exists(layout.LEASE_KEY)  # left behind, never released
    with caplog.at_level("WARNING"):
        new = Lease(store, LeaseSettings(timeout_s=600, wait_s=0.0), holder="next")
        new.acquire()  # wait_s=0: it must not need the 600 s timeout
    assert "took over the run lease" in caplog.text and "is gone" in caplog.text
    new.release()


def test_lease_of_a_live_process_on_this_host_is_not_taken(store_uri: str) -> None:
    """The same host, a process that is alive (this one): still refused."""
    store = open_store(store_uri)
    first = Lease(store, LeaseSettings(timeout_s=600, wait_s=0.0), holder="a")
    first.acquire(heartbeat=False)
    try:
        with pytest.raises(RunLocked):
            Lease(store, LeaseSettings(timeout_s=600, wait_s=0.0), holder="b").acquire()
    finally:
        first.release()


def test_a_local_lease_leaves_no_stray_file_in_the_run_dir(tmp_path: Path) -> None:
    """The compare-and-swap lock of a local store is not a file in the run dir: while held
    the run dir shows only ``lease.json``; after release it is empty."""
    run = tmp_path / "run"
    store = open_store(str(run))
    lease = Lease(store, FAST, holder="pod-a").acquire(heartbeat=False)
    lease.renew()  # a compare-and-swap: takes the lock
    assert sorted(p.name for p in run.rglob("*")) == [layout.LEASE_KEY]
    lease.release()  # delete-if-ours: takes the lock too
    assert sorted(p.name for p in tmp_path.rglob("*")) in ([], ["run"])
