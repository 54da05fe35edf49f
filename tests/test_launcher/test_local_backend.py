"""launcher.backends.local with a stand-in runner (the real one trains; this one only follows
the entrypoint contract: CONFIG argument, env, progress.json, exit codes, SIGTERM → 143)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from kube_configs import config_dict

from kubetune.config import parse_config
from kubetune.errors import UserError
from launcher.backends.local import LocalBackend

STAND_IN = """
import json, os, signal, sys, time, yaml
cfg = yaml.safe_load(open(sys.argv[1]))
out = cfg["base_output_dir"]; os.makedirs(out, exist_ok=True)
def progress(state):
    eta = {"eta_seconds": float(os.environ["STAND_IN_ETA"])} if "STAND_IN_ETA" in os.environ else {}
    json.dump({"state": state, "step": 5, "total_steps": 10, "loss": 0.5, **eta},
              open(os.path.join(out, "progress.json"), "w"))
def preempted(*args):
    print("checkpointed", flush=True)
    progress("preempted")
    sys.exit(143)
signal.signal(signal.SIGTERM, preempted)
print("run", os.environ["KUBETUNE_RUN"], "config", os.environ["KUBETUNE_CONFIG"], flush=True)
print("args", *sys.argv[2:], flush=True)
progress("running")
if os.environ.get("STAND_IN_SIGNAL"):
    os.kill(os.getpid(), int(os.environ["STAND_IN_SIGNAL"]))
time.sleep(float(os.environ.get("STAND_IN_SLEEP", "0")))
print("done", flush=True)
if os.environ.get("STAND_IN_ERROR"):
    print("kubetune: error: " + os.environ["STAND_IN_ERROR"], flush=True)
code = int(os.environ.get("STAND_IN_EXIT", "0"))
progress("completed" if code == 0 else "failed")
sys.exit(code)
"""


def _cfg(tmp_path: Path, **job: object):  # noqa: ANN202
    data = config_dict(**job)
    del data["storage"]
    data["base_output_dir"] = str(tmp_path / "out" / "my-run")
    return parse_config(yaml.safe_dump(data))


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return LocalBackend(home=tmp_path / "home", entrypoint=[sys.executable, str(script)])


def _wait_done(backend: LocalBackend, run: str, timeout: float = 20.0):  # noqa: ANN202
    deadline = time.monotonic() + timeout
    while not (status := backend.status(run)).done:
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    return status


def test_submit_status_logs(backend: LocalBackend, tmp_path: Path) -> None:
    result = backend.submit(_cfg(tmp_path))
    assert result.created and result.output_uri == str(tmp_path / "out" / "my-run")
    assert not backend.submit(_cfg(tmp_path)).created
    status = _wait_done(backend, "my-run")
    assert status.phase == "Succeeded"
    assert status.progress is not None and status.progress.step == 5
    lines = list(backend.logs("my-run"))
    assert lines[0].startswith("run my-run config ") and lines[0].endswith("config.yaml")
    assert lines[-1] == "done"
    assert [r.run for r in backend.list()] == ["my-run"]


@pytest.mark.slow
def test_failure_and_conflict(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_EXIT", "2")
    backend.submit(_cfg(tmp_path))
    status = _wait_done(backend, "my-run")
    assert (status.phase, status.reason) == ("Failed", "exit code 2")
    assert "config or data error" in (status.message or "")
    with pytest.raises(UserError, match="different config.*--replace"):
        backend.submit(_cfg(tmp_path, cpu="8"))
    monkeypatch.setenv("STAND_IN_EXIT", "0")
    assert backend.submit(_cfg(tmp_path, cpu="8"), replace=True).created
    assert _wait_done(backend, "my-run").phase == "Succeeded"


def test_cancel_sends_sigterm_and_logs_follow(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    backend.submit(_cfg(tmp_path))
    deadline = time.monotonic() + 10
    while not (tmp_path / "out" / "my-run" / "progress.json").exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert backend.status("my-run").phase == "Running"
    assert backend.cancel("my-run").phase == "Cancelled"
    assert list(backend.logs("my-run", follow=True))[-1] == "checkpointed"
    status = _wait_done(backend, "my-run")
    assert status.phase == "Cancelled"
    assert json.loads((tmp_path / "home" / "runs" / "my-run" / "exit_code").read_text()) == 143


def test_cancel_right_after_submit_is_cancelled_and_leaves_no_runner(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGTERM that reaches the supervising shim before it forwards signals (as a Cancel
    button pressed at once does) ends the run as Cancelled, not Lost, with no orphan runner."""
    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    for delay in (0.0, 0.05, 0.15, 0.3):
        cfg = _cfg(tmp_path, name=f"early-{int(delay * 100)}")
        run = backend.submit(cfg).run
        time.sleep(delay)
        backend.cancel(run, wait=True, timeout=20)
        status = _wait_done(backend, run)
        assert status.phase == "Cancelled", (delay, status)
    time.sleep(0.5)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(tmp_path / "stand_in.py") not in ps.stdout


def test_unknown_run(backend: LocalBackend) -> None:
    with pytest.raises(UserError, match="no local run"):
        backend.status("nope")


def test_cancel_of_an_unknown_run_is_a_one_line_error(tmp_path: Path) -> None:
    """`launcher cancel nope` said FileNotFoundError with a traceback (it touched a marker
    in a run folder that does not exist); now exit 2 naming the run, and no folder made."""
    from click.testing import CliRunner

    from launcher.cli.main import main

    home = tmp_path / "home"
    out = CliRunner().invoke(main, ["cancel", "--local", "nope"], env={"KUBETUNE_HOME": str(home)})
    assert out.exit_code == 2, out.output
    assert "no local run 'nope'" in out.output and "Traceback" not in out.output
    assert not (home / "runs" / "nope").exists()


def test_cancel_of_an_ended_run_keeps_its_phase(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a run that already ended changes nothing: a Failed run stayed Failed only
    until `cancel` left its marker, then read Cancelled and lost its exit code's reason."""
    monkeypatch.setenv("STAND_IN_EXIT", "2")
    backend.submit(_cfg(tmp_path))
    assert _wait_done(backend, "my-run").phase == "Failed"
    assert backend.cancel("my-run").phase == "Failed"
    status = backend.status("my-run")
    assert (status.phase, status.reason) == ("Failed", "exit code 2")


def test_an_unwritable_home_is_a_one_line_error(tmp_path: Path) -> None:
    """`submit --local` where the run folder cannot be made (HOME not writable, KUBETUNE_HOME
    under a file) says which folder and how to fix it, exit status 1, no traceback."""
    import subprocess

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**config_dict(), "storage": None}))
    env = {**__import__("os").environ, "KUBETUNE_HOME": str(blocker / "kubetune")}
    out = subprocess.run(
        [sys.executable, "-m", "launcher", "submit", "--local", str(config)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stderr and "KUBETUNE_HOME" in out.stderr
    assert str(blocker / "kubetune") in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_multi_node_config_runs_as_one_local_node(backend: LocalBackend, tmp_path: Path) -> None:
    """`submit --local` of a `job.nodes: 2` config: one node here, said in a warning; `logs
    --rank` other than 0 names the one node."""
    result = backend.submit(_cfg(tmp_path, nodes=2))
    assert result.warnings and "a local run is one node" in result.warnings[0]
    assert backend.submit(_cfg(tmp_path, name="one-node")).warnings == ()
    _wait_done(backend, "my-run")
    assert list(backend.logs("my-run", rank=0))[-1] == "done"
    with pytest.raises(UserError, match="one node"):
        list(backend.logs("my-run", rank=1))


CORRUPT_RUN_JSON = {
    "truncated": ('{"run": "bad", "pid": 12', "not valid JSON"),
    "not-an-object": ("[1, 2]", "a JSON list where an object is expected"),
    "missing-fields": ('{"run": "bad"}', "lacks config_hash, job_name, output_uri, pid, started"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_RUN_JSON))
def test_a_corrupt_run_json_is_listed_as_unreadable_beside_the_others(
    tmp_path: Path, case: str
) -> None:
    """A local run whose run.json is damaged (truncated, not an object, fields missing) is
    listed as Unreadable, naming the file and why; the other runs still list, and asking for
    that run is a one-line KubetuneError naming the file instead of a JSON traceback."""
    from ui_support import fake_local_run

    from kubetune.errors import KubetuneError

    home = tmp_path / "home"
    fake_local_run(home, tmp_path / "out", "fine")
    text, why = CORRUPT_RUN_JSON[case]
    bad = home / "runs" / "bad" / "run.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    backend = LocalBackend(home)
    rows = {s.run: s for s in backend.list()}
    assert rows["fine"].phase == "Succeeded"
    assert rows["bad"].phase == "Unreadable" and rows["bad"].done
    assert str(bad) in rows["bad"].message and why in rows["bad"].message
    with pytest.raises(KubetuneError, match=why) as err:
        backend.status("bad")
    assert str(bad) in str(err.value) and len(str(err.value).splitlines()) == 1


def test_the_cli_names_a_corrupt_run_json_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`launcher list --local` lists the readable runs and says on stderr, in one line, which
    run.json it could not read and why; `launcher status`, `report` and `logs` of that run
    are that one-line error (exit 1), no traceback."""
    from click.testing import CliRunner
    from ui_support import fake_local_run

    from launcher.cli.main import main

    home = tmp_path / "home"
    monkeypatch.setenv("KUBETUNE_HOME", str(home))
    fake_local_run(home, tmp_path / "out", "fine")
    bad = home / "runs" / "bad" / "run.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("[]")
    listed = CliRunner().invoke(main, ["list", "--local"])
    assert listed.exit_code == 0, listed.output
    rows = {line.split()[0]: line.split()[1] for line in listed.stdout.splitlines()[1:]}
    assert rows == {"fine": "Succeeded", "bad": "Unreadable"}
    assert listed.stderr.splitlines() == [
        f"error: {bad}: a JSON list where an object is expected "
        f"(remove {bad.parent} to forget this run; its outputs stay where they are)"
    ]
    for command in ("status", "report", "logs"):
        asked = CliRunner().invoke(main, [command, "bad", "--local"])
        assert asked.exit_code == 1 and "Traceback" not in asked.output, command
        assert asked.stderr.splitlines() == listed.stderr.splitlines(), command


def test_replace_starts_over_a_run_whose_run_json_is_damaged(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """Submitting a config whose local run has a damaged run.json is the one-line error naming
    the file, which now says `--replace` starts the run over; with `--replace` the run folder
    is remade and the run starts from step 0 (`--no-resume`), its outputs untouched."""
    from launcher.backends.local import RunRecordError

    cfg = _cfg(tmp_path)
    backend.submit(cfg)
    _wait_done(backend, "my-run")
    record = backend.runs / "my-run" / "run.json"
    record.write_text('{"run": "my-ru')
    with pytest.raises(RunRecordError, match="not valid JSON") as err:
        backend.submit(cfg)
    assert "--replace" in str(err.value.hint) and str(record) in str(err.value)
    assert (tmp_path / "out" / "my-run" / "progress.json").exists()
    result = backend.submit(cfg, replace=True)
    assert result.created and "starting over" in (result.note or "")
    assert _wait_done(backend, "my-run").phase == "Succeeded"
    assert "args --no-resume" in list(backend.logs("my-run"))
    assert json.loads(record.read_text())["run"] == "my-run"


def test_failed_on_bad_input_shows_the_runners_error_line(tmp_path: Path) -> None:
    """Exit 2: `status` (and the UI's Reason) carry the runner's one-line error, not only a
    pointer to the logs; a stand-in runner that prints as `python -m runner` does."""
    script = tmp_path / "bad_input.py"
    script.write_text(
        "import sys\nprint('INFO loading', flush=True)\n"
        "print('kubetune: error: bucket \\'nope\\' does not exist', file=sys.stderr)\n"
        "print('more detail', file=sys.stderr)\nsys.exit(2)\n"
    )
    backend = LocalBackend(home=tmp_path / "home", entrypoint=[sys.executable, str(script)])
    backend.submit(_cfg(tmp_path))
    status = _wait_done(backend, "my-run")
    assert (status.phase, status.reason) == ("Failed", "exit code 2")
    assert status.message == "bucket 'nope' does not exist (log: `launcher logs --local my-run`)"
    assert status.retries == 1  # `status` prints "failed attempts: 1", not 0, for this run


def test_a_killed_run_says_which_signal_not_its_last_log_line(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A runner killed by SIGKILL (the out-of-memory killer, kill -9) read `Failed (exit code
    137: <its last INFO progress line>)`, which says nothing of what happened."""
    monkeypatch.setenv("STAND_IN_SIGNAL", "9")
    monkeypatch.setenv("STAND_IN_ETA", "15")
    backend.submit(_cfg(tmp_path))
    status = _wait_done(backend, "my-run")
    assert (status.phase, status.reason) == ("Failed", "exit code 137"), status
    assert status.message is not None and "killed by SIGKILL" in status.message
    assert "out of memory" in status.message and "args" not in status.message
    # its record still says running (SIGKILL leaves nothing written): status says it is not
    assert status.progress is not None and status.progress.state == "running"
    assert status.summary().endswith("; not running: last record at step 5, no end recorded")
    again = backend.submit(_cfg(tmp_path))  # the resume note quotes where it ended: no ETA
    assert again.note is not None and "ended Failed at step 5/10" in again.note
    assert "ETA" not in again.note


def test_report_of_a_killed_run_says_its_page_is_not_live(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """report.html is rewritten at each validation and at the end; a runner killed between
    (SIGKILL) leaves a page that still says running. `launcher report` says on stderr that
    the run is not running and where its record stops; a finished run's page gets no note."""
    from click.testing import CliRunner

    from launcher.cli.main import main

    monkeypatch.setenv("STAND_IN_SIGNAL", "9")
    backend.submit(_cfg(tmp_path))
    _wait_done(backend, "my-run")
    (tmp_path / "out" / "my-run" / "report.html").write_text("<!DOCTYPE html><title>r</title>")
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    killed = CliRunner().invoke(main, ["report", "my-run", "--local"])
    assert killed.exit_code == 0, killed.output
    assert killed.stdout.strip() == str(tmp_path / "out" / "my-run" / "report.html")
    assert "not running: last record at step 5, no end recorded" in killed.stderr
    monkeypatch.delenv("STAND_IN_SIGNAL")
    backend.submit(_cfg(tmp_path))  # resumed; the stand-in ends completed
    _wait_done(backend, "my-run")
    finished = CliRunner().invoke(main, ["report", "my-run", "--local"])
    assert finished.exit_code == 0 and finished.stderr == "", finished.output


def test_an_ended_run_shows_no_eta() -> None:
    """A run killed mid-training keeps the progress record of a running one: `status` showed
    `Failed (...); step 10/40, ..., ETA 15s`, an ETA for a run that will not go on."""
    from launcher.backends.base import Progress, RunStatus

    progress = Progress(state="running", step=10, total_steps=40, eta_seconds=15)
    running = RunStatus("local", "r", "j", "Running", progress=progress)
    assert "ETA" in running.summary()
    failed = RunStatus("local", "r", "j", "Failed", reason="exit code 137", progress=progress)
    assert "step 10/40" in failed.summary() and "ETA" not in failed.summary()
    from launcher.ui.runs import row_of  # the UI's runs table and run page alike

    assert (row_of(running)["eta"], row_of(failed)["eta"]) == ("15s", None)
    assert "no end recorded" in failed.summary() and "no end" not in running.summary()
    assert (row_of(running)["ending"], row_of(failed)["ending"]) == (
        None, "not running: last record at step 10, no end recorded")  # fmt: skip
    crashed = Progress(state="failed", step=10, error="boom", exit_code=1)
    ended = RunStatus("kubernetes", "r", "j", "Failed", reason="BackoffLimitExceeded",
                      progress=crashed)  # fmt: skip
    assert ended.summary().endswith("; failed at step 10: boom (exit code 1)")


def test_a_long_error_line_is_not_cut_mid_word(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner's one-line error (the fix is at its end) was cut at 300 characters:
    '... at a local diffusers folder or an s3:// pre (log: ...)'."""
    error = "madebyollin/sdxl-vae-fp16-fix: cannot download vae: " + "word " * 70 + "s3:// prefix)"
    monkeypatch.setenv("STAND_IN_EXIT", "2")
    monkeypatch.setenv("STAND_IN_ERROR", error)
    backend.submit(_cfg(tmp_path))
    status = _wait_done(backend, "my-run")
    assert status.message is not None and status.message.startswith(error + " (log: ")


def test_ctrl_c_on_logs_follow_says_the_run_goes_on(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C is how `launcher logs -f` ends: it said `error: interrupted`, as if something
    had gone wrong, and not whether the run went on."""
    import os
    import signal

    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    backend.submit(_cfg(tmp_path))
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "logs", "-f", "my-run"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("run my-run")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        backend.cancel("my-run")
    assert proc.returncode == 130
    assert "error" not in err and "stopped following; the run my-run goes on" in err


def test_two_submits_of_one_run_at_once_start_it_once(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `submit --local` of the same config at once: the second lost the race to create
    the run folder and said `cannot create the local run folder ...: File exists (set
    KUBETUNE_HOME to a writable folder)`. Now it answers as for a run that exists."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    cfg = _cfg(tmp_path)
    try:
        for _ in range(3):  # the race is narrow: try it a few times
            with ThreadPoolExecutor(2) as pool:
                results = list(pool.map(lambda _: backend.submit(cfg), range(2)))
            assert sorted(r.created for r in results) == [False, True]
            backend.cancel("my-run", wait=True, timeout=20)
            shutil.rmtree(tmp_path / "home" / "runs" / "my-run")
    finally:
        if (tmp_path / "home" / "runs" / "my-run" / "run.json").exists():
            backend.cancel("my-run", wait=True, timeout=20)


def test_a_run_folder_left_without_its_record_is_taken_over(
    backend: LocalBackend, tmp_path: Path
) -> None:
    """A run folder without run.json (a submit killed between the two) blocked the run's
    name for good with `File exists`."""
    import os

    left = tmp_path / "home" / "runs" / "my-run"
    left.mkdir(parents=True)
    os.utime(left, (time.time() - 60, time.time() - 60))  # from an earlier submit
    assert backend.submit(_cfg(tmp_path)).created
    assert _wait_done(backend, "my-run").phase == "Succeeded"


def test_replace_of_a_running_run_says_why_nothing_happened(
    backend: LocalBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`submit --local --replace` of a run that is still running (same config) answered only
    `already running (same config)`: the --replace asked for was silently not done."""
    monkeypatch.setenv("STAND_IN_SLEEP", "30")
    backend.submit(_cfg(tmp_path))
    try:
        again = backend.submit(_cfg(tmp_path), replace=True)
        assert not again.created and again.note is not None
        assert "already running" in again.note and "launcher cancel my-run" in again.note
    finally:
        backend.cancel("my-run", wait=True, timeout=20)
