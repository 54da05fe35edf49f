"""A real ``python -m runner`` on ``builtin:tiny-sd`` SIGKILLed mid-training (as the OOM killer
or a lost node ends a pod) writes no end: its progress.json still says running. Readers with
only its folder or store URI — ``launcher status``, ``report`` and ``pull`` of the location —
say so once its lease has expired unrenewed (``lease_timeout_seconds``, short here), and call
it running while the runner lives and renews the lease. Outputs in a local folder and on
SeaweedFS. Every wait is bounded (the run's progress by a deadline, the lease by its timeout).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from train_support import REPO, config_file, make_config, write_dataset

from kubetune import layout
from kubetune.storage import ObjectStore, open_store
from launcher.cli.main import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
LEASE_S = 8.0  # renewed every 2 s by the live runner


def cli(*args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, list(args))
    return done.exit_code, done.stdout, done.stderr


def wait_for_training(proc: subprocess.Popen[bytes], store: ObjectStore, log: Path) -> None:
    """Until step 3 is recorded, checkpoint 2 published and the report written (5 minutes
    at most; fails at once with the log's tail if the runner exits)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            step = layout.ProgressRecord.from_bytes(store.get_bytes(layout.PROGRESS_KEY)).step
        except (FileNotFoundError, ValueError):
            step = 0
        ready = store.exists(layout.manifest_key(2)) and store.exists(layout.REPORT_KEY)
        if step >= 3 and ready:
            return
        time.sleep(0.5)
    pytest.fail(f"no step 3 within 5 minutes: {log.read_text()[-3000:]}")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_sigkilled_runner_reads_not_running_once_its_lease_expires(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    uri = str(tmp_path / "out") if where == "local" else f"{request.getfixturevalue('s3_uri')}/k"
    cfg = make_config("SD_LORA", Path("builtin:tiny-sd"), write_dataset(tmp_path / "data", n=2),
                      uri, train_batch_size=1, max_train_steps=100_000, save_every_n_steps=2,
                      log_every_n_steps=1, validate_every_n_steps=2, validation_prompts=["a cat"],
                      num_validation_images_per_prompt=1,
                      lease_timeout_seconds=LEASE_S)  # type: ignore[arg-type]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "KUBETUNE_WORK_DIR": str(tmp_path / "work")}  # fmt: skip
    log = tmp_path / "runner.log"
    store = open_store(uri)
    command = [sys.executable, "-m", "runner", str(config_file(cfg, tmp_path / "run.yaml"))]
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=sink, stderr=sink)
        try:
            wait_for_training(proc, store, log)
            live = json.loads(cli("status", uri, "--format", "json")[1])  # renewed: running
            assert (live["running"], live["ending"]) == (True, None), live
            assert "note" not in json.loads(cli("report", uri, "--format", "json", "-o",
                                                str(tmp_path / "v.html"))[1])  # fmt: skip
        finally:
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL

    record = layout.ProgressRecord.from_bytes(store.get_bytes(layout.PROGRESS_KEY))
    assert record.state == "running" and record.step >= 3, record  # SIGKILL wrote no end
    lease = store.get_bytes(layout.LEASE_KEY)  # nor released its lease
    term = layout.LeaseTerm.from_bytes(lease)
    assert term is not None and term.expires_unix is not None
    assert term.expires_unix - time.time() <= LEASE_S + 1  # renewed by the runner until killed
    time.sleep(max(0.0, term.expires_unix - time.time() + 0.2))
    ending = (f"not running: last record at step {record.step} ({record.updated_at}), no end "
              f"recorded; its lease expired at {term.expires_at}")  # fmt: skip

    code, out, _ = cli("status", uri)
    assert code == 0 and out.strip().endswith(f"; {ending}"), out
    doc = json.loads(cli("status", uri, "--format", "json")[1])
    assert (doc["running"], doc["ending"]) == (False, ending), doc
    code, _, err = cli("report", uri, "-o", str(tmp_path / "v.html"))
    assert code == 0 and err.strip().endswith(f"trained; it is {ending}"), err
    code, _, err = cli("pull", uri, "-o", str(tmp_path / "final"))
    assert code == 2 and f"(the run is {ending})" in err, err
    code, out, _ = cli("pull", uri, "--step", "2", "-o", str(tmp_path / "s2"), "--format", "json")
    assert code == 0 and json.loads(out)["note"] == f"note: {uri} is {ending}", out
    assert (tmp_path / "s2" / "lora.safetensors").is_file()
