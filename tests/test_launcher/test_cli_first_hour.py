"""What a newcomer meets in the CLI's first hour: every `--help` example names files that
exist and parses as written; `list` / `status` without a cluster show this machine's runs;
`submit --follow` interrupted says the run goes on and how to stop it."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from test_local_backend import _cfg, _wait_done, backend  # noqa: F401 - the fixture

from launcher.backends.local import LocalBackend
from launcher.cli.main import main

ROOT = Path(__file__).parents[2]


def _help_examples() -> list[tuple[str, str]]:
    """(command whose help shows it, example line) for every `launcher ...` line of every
    command's --help, the group's own included."""
    found = []
    for name in [None, *sorted(main.commands)]:
        text = CliRunner().invoke(main, [*([name] if name else []), "--help"]).output
        for line in text.splitlines():
            if line.strip().startswith("launcher "):
                found.append((name or "launcher", line.strip()))
    return found


def test_every_help_example_exists_and_parses() -> None:
    examples = _help_examples()
    assert len(examples) >= 10
    for where, line in examples:
        words = shlex.split(line.split(" | ")[0], comments=True)[1:]
        command = main.commands[words[0]]
        for word in words[1:]:
            for path in re.findall(r"(?:^|=)(examples/\S+)", word):
                assert (ROOT / path).exists(), f"{where} --help: {line}: {path} does not exist"
        try:
            command.make_context(words[0], words[1:])
        except click.UsageError as err:
            pytest.fail(f"{where} --help: {line}: {err}")


def _no_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # no ~/.kube/config
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)


def test_list_and_status_without_a_cluster_show_local_runs(
    backend: LocalBackend,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _no_cluster(monkeypatch, tmp_path)
    backend.submit(_cfg(tmp_path))
    _wait_done(backend, "my-run")
    listed = CliRunner().invoke(main, ["list"])
    assert listed.exit_code == 0, listed.output
    assert "no cluster configured" in listed.stderr and "showing the runs on this machine" in (
        listed.stderr
    )
    assert re.search(r"^my-run +Succeeded", listed.stdout, re.M), listed.stdout
    missing = CliRunner().invoke(main, ["status", "nope"])
    assert missing.exit_code == 2 and "no local run 'nope'" in missing.output


@pytest.mark.slow
def test_follow_interrupted_says_the_run_goes_on(tmp_path: Path) -> None:
    """SIGTERM to `submit --local --follow` (the real runner, on the quickstart config) stops
    the following only: the message names status / logs / cancel, exit 130, the run goes on
    until `launcher cancel` stops it."""
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "out" / "follow-me"
    launcher = [sys.executable, "-m", "launcher"]
    submit = [*launcher, "submit", "--local", "--follow", str(ROOT / "examples/quickstart.yaml"),
              "--name", "follow-me", "--set", f"base_output_dir={out}"]  # fmt: skip
    proc = subprocess.Popen(submit, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    try:
        _interrupt_follow(proc, tmp_path, env)
    finally:
        proc.kill()
        if (tmp_path / "home" / "runs" / "follow-me").is_dir():  # never leave the run behind
            LocalBackend(home=tmp_path / "home").cancel("follow-me", wait=True, timeout=120)


def _interrupt_follow(proc: subprocess.Popen[str], tmp_path: Path, env: dict[str, str]) -> None:
    launcher = [sys.executable, "-m", "launcher"]
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "follow-me: submitted as local job" in first, first
    time.sleep(1.0)  # following the log now
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "the run follow-me goes on" in stderr
    for command in ("launcher status --local follow-me", "launcher cancel --local follow-me"):
        assert command in stderr
    status = subprocess.run([*launcher, "status", "follow-me"], capture_output=True, text=True,
                            env=env, timeout=60)  # fmt: skip
    assert status.stdout.startswith("follow-me: Running"), status.stdout + status.stderr
    cancel = [*launcher, "cancel", "--local", "follow-me", "--wait", "--timeout", "120"]
    done = subprocess.run(cancel, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0 and "Cancelled" in done.stdout, done.stdout + done.stderr


def test_follow_draws_a_bar_only_at_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from launcher.follow import follow, wants_bar

    lines = ["INFO runner: run r (outputs in /o): checking the dataset",
             *(f"INFO runner.reporting.progress: step {s}/40 epoch 1 loss 0.5 lr 0.001 "
               f"9 img/s ETA 1s" for s in (5, 40)),
             "INFO runner.session.build: training finished at step 40"]  # fmt: skip
    assert not wants_bar()  # pytest's stdout is not a terminal
    follow(iter(lines), print, bar=False)
    assert capsys.readouterr().out.splitlines() == lines
    follow(iter(lines), print, bar=True)
    out = capsys.readouterr().out
    assert all(line in out for line in lines)
    assert "training" in out and "40/40" in out and "loss 0.5" in out


def test_submit_wait_exit_status_follows_the_run() -> None:
    from launcher.backends.base import RunStatus
    from launcher.cli.run_commands import run_exit_code

    def status(phase: str, reason: str | None = None, message: str | None = None) -> RunStatus:
        return RunStatus("local", "r", "j", phase, reason=reason, message=message)

    assert run_exit_code(status("Succeeded")) == 0
    assert run_exit_code(status("Failed", "exit code 2", "config or data error")) == 2
    assert run_exit_code(status("Failed", "BackoffLimitExceeded", "exit code 2: config")) == 2
    assert run_exit_code(status("Failed", "exit code 1", "boom")) == 1
    assert run_exit_code(status("Preempted", "SIGTERM")) == 1


def test_every_command_help_shows_an_example() -> None:
    """A newcomer learns a command from its --help: each shows at least one invocation."""
    for name in sorted(main.commands):
        text = CliRunner().invoke(main, [name, "--help"]).output
        assert re.search(rf"^\s+launcher {name}\b", text, re.M), f"{name} --help has no example"


def test_init_says_where_the_images_go_then_validates(tmp_path: Path) -> None:
    """The starter's dataset folder does not exist yet: init names it (absolute) and the field,
    and the file validates once images are there."""
    out = tmp_path / "lora.yaml"
    made = CliRunner().invoke(main, ["init", "--type", "SD_LORA", "-o", str(out)])
    assert made.exit_code == 0, made.output
    images = tmp_path / "data" / "my-images"
    assert str(images) in made.stderr and "data_loader.dataset.dataset_dir" in made.stderr
    assert CliRunner().invoke(main, ["validate", str(out)]).exit_code == 2
    shutil.copytree(ROOT / "examples" / "sample_data", images)
    checked = CliRunner().invoke(main, ["validate", str(out)])
    assert checked.exit_code == 0, checked.output


@pytest.mark.parametrize("command", ["submit", "status", "pull", "report"])
def test_format_json_errors_are_one_json_document(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI reads stdout with --format json: a refused command still prints one document there
    (the error lines and exit status), and the `error:` lines on stderr."""
    _no_cluster(monkeypatch, tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("type: SD_LORA\nmax_train_step: 10\n")
    target = ["--local", str(bad)] if command == "submit" else ["nope"]
    result = CliRunner().invoke(main, [command, "--format", "json", *target])
    assert result.exit_code == 2, result.output
    error = json.loads(result.stdout)["error"]
    assert error["exit_code"] == 2 and error["problems"], error
    assert result.stderr.splitlines()[0] == f"error: {error['problems'][0]}"
    if command == "submit":
        assert any("max_train_step: unknown key" in p for p in error["problems"])


def test_submit_without_a_cluster_says_so_and_offers_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No kubeconfig and not in a pod: one line that says no cluster is configured and how to
    train anyway, not the in-cluster loader's 'Service host/port is not set.'"""
    _no_cluster(monkeypatch, tmp_path)
    result = CliRunner().invoke(main, ["submit", str(ROOT / "examples" / "quickstart.yaml")])
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("error: no cluster configured (no --kubeconfig, $KUBECONFIG")
    assert "launcher submit --local" in result.stderr and "host/port" not in result.stderr
