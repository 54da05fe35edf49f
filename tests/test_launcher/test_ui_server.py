"""`launcher ui`'s server over real HTTP (uvicorn in a thread): the bind check, the token,
CSRF and Host checks, paths kept under the started-with folders, and the light CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from kubetune.errors import UserError
from launcher.cli.main import main
from launcher.ui.security import TOKEN_ENV, UiSettings, redact, settings_for
from launcher.ui.server import create_app, serve_in_thread

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def request(
    url: str, data: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, str, Any]:
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers=headers or {})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(req, timeout=30) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def csrf_of(page: str) -> str:
    return page.split('name="kubetune-csrf" content="')[1].split('"')[0]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    with serve_in_thread(create_app(UiSettings(port=0, local_only=True))) as url:
        yield url


def test_a_non_loopback_bind_without_a_token_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    result = CliRunner().invoke(main, ["ui", "--host", "0.0.0.0", "--port", "1"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "needs a token" in result.output
    settings = settings_for("0.0.0.0", 1, [Path.cwd()], new_token=True)
    assert settings.token and settings.restricted
    monkeypatch.setenv(TOKEN_ENV, "short")
    assert CliRunner().invoke(main, ["ui", "--host", "10.1.2.3"]).exit_code == 2


def test_state_changing_requests_need_the_pages_csrf_value(server: str) -> None:
    status, page, headers = request(server + "/")
    assert status == 200 and "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    values = {"values": {"type": "SD_LORA"}}
    assert request(server + "/api/generate", values)[0] == 403
    good = {"X-Kubetune-CSRF": csrf_of(page), "Content-Type": "application/json"}
    assert (
        request(server + "/api/generate", values, {**good, "Origin": "http://evil.example"})[0]
        == 403
    )
    status, text, _ = request(server + "/api/generate", values, good)
    assert status == 200 and json.loads(text)["valid"] is False


def test_save_does_not_overwrite_a_file_until_asked_again(server: str, tmp_path: Path) -> None:
    """Save onto an existing file replaced it at once (examples/quickstart.yaml lost its
    comments to the generated YAML); now the page hears that it exists, and a second Save
    (overwrite) replaces it."""
    _, page, _ = request(server + "/")
    post = {"X-Kubetune-CSRF": csrf_of(page), "Content-Type": "application/json"}
    target = tmp_path / "mine.yaml"
    target.write_text("# my notes\ntype: SD_LORA\n")
    save = {"path": str(target), "text": "type: SD_LORA\n"}
    status, text, _ = request(server + "/api/save", save, post)
    assert (status, json.loads(text)) == (200, {"exists": str(target)})
    assert target.read_text().startswith("# my notes")
    status, text, _ = request(server + "/api/save", {**save, "overwrite": True}, post)
    assert (status, json.loads(text)) == (200, {"saved": str(target)})
    assert target.read_text() == "type: SD_LORA\n"


def test_a_foreign_host_header_is_refused_on_loopback(server: str) -> None:
    """DNS rebinding: a page of another site resolving its name to 127.0.0.1."""
    assert request(server + "/", headers={"Host": "evil.example"})[0] == 400


def test_beyond_loopback_a_token_is_needed_and_paths_stay_under_the_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "t0ken-for-the-test-0123456789")
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    (tmp_path / "root").mkdir()
    settings = settings_for("10.1.2.3", 0, [tmp_path / "root"], local_only=True)
    # bound to 127.0.0.1 for the test (traffic stays local), configured as if beyond loopback
    with serve_in_thread(create_app(settings)) as url:
        assert request(url + "/")[0] == 401
        assert request(url + "/api/runs")[0] == 401
        status, _, headers = request(url + "/?token=t0ken-for-the-test-0123456789")
        assert status == 303 and "HttpOnly" in headers["set-cookie"]
        auth = {"Authorization": "Bearer t0ken-for-the-test-0123456789"}
        status, page, _ = request(url + "/", headers=auth)
        assert status == 200 and "t0ken" not in page
        post = {**auth, "X-Kubetune-CSRF": csrf_of(page), "Content-Type": "application/json"}
        status, text, _ = request(url + "/api/reference", {"path": str(QUICKSTART)}, post)
        assert status == 400 and "outside the folders" in json.loads(text)["error"]
        (tmp_path / "root" / "q.yaml").write_text(QUICKSTART.read_text())
        status, text, _ = request(url + "/api/reference", {"path": "q.yaml"}, post)
        assert status == 200 and json.loads(text)["type"] == "SD_LORA"
        save = {"path": str(tmp_path / "elsewhere.yaml"), "text": "type: SD_LORA\n"}
        status, text, _ = request(url + "/api/save", save, post)
        assert status == 400 and not (tmp_path / "elsewhere.yaml").exists()
        save["path"] = "sub/ok.yaml"
        assert request(url + "/api/save", save, post)[0] == 200
        assert (tmp_path / "root" / "sub" / "ok.yaml").read_text() == "type: SD_LORA\n"


def test_secret_values_are_redacted() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value", "HOME": "/home/someone"}
    assert redact("key s3cr3t-value in /home/someone", env) == "key *** in /home/someone"


def test_help_does_not_import_the_web_stack() -> None:
    code = (
        "import sys, launcher.cli.main\n"
        "from click.testing import CliRunner\n"
        "CliRunner().invoke(launcher.cli.main.main, ['--help'])\n"
        "CliRunner().invoke(launcher.cli.main.main, ['ui', '--help'])\n"
        "print(sorted(m for m in ('starlette', 'uvicorn', 'launcher.ui.server', 'PIL')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_a_sweep_from_the_form_is_grouped_and_a_run_without_progress_reads(
    tmp_path: Path,
) -> None:
    """Start Training with a sweep on the local backend (a stand-in runner that writes no
    progress): both runs are listed under the sweep with their values; a run page with no
    progress.json, history or grids yet is data, not an error."""
    import time

    from launcher.backends.local import LocalBackend
    from launcher.ui.configs import reload_reference
    from launcher.ui.runs import Runs
    from launcher.ui.submit import start_training

    script = tmp_path / "stand_in.py"
    script.write_text("import time; print('working', flush=True); time.sleep(0.3)\n")
    runs = Runs(local=LocalBackend(tmp_path / "home", [sys.executable, str(script)]))
    values = reload_reference(QUICKSTART.read_text(), "q", QUICKSTART.parent)["values"]
    values["base_output_dir"] = str(tmp_path / "out")
    settings = UiSettings(local_only=True)
    result = start_training(values, target="local", replace=False, runs=runs, settings=settings,
                            sweeps=["optimizer.learning_rate=1e-4,5e-5"])  # fmt: skip
    planned = result["submitted"]
    assert len(planned) == 2 and {p["sweep"] for p in planned} == {"quickstart"}
    deadline = time.monotonic() + 60
    while True:
        rows = runs.listing()["runs"]
        if len(rows) == 2 and all(r["phase"] == "Succeeded" for r in rows):
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert sorted(r["params"]["optimizer.learning_rate"] for r in rows) == ["1e-4", "5e-5"]
    assert {r["sweep"] for r in rows} == {"quickstart"} and rows[0]["step"] is None
    detail = runs.detail("local", rows[0]["run"])
    assert (detail["history"], detail["grids"], detail["final"]) == ([], [], [])
    assert runs.logs("local", rows[0]["run"]) == ["working"]


def test_launcher_ui_serves_until_stopped(tmp_path: Path) -> None:
    """The real command: `launcher ui` prints its URL and serves the page."""
    import os
    import signal
    import socket
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "ui", "--port", str(port), "--local-only"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(f"kubetune ui: http://127.0.0.1:{port}/")
        deadline = time.monotonic() + 30
        while True:
            try:
                status, page, _ = request(f"http://127.0.0.1:{port}/")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert status == 200 and "kubetune-csrf" in page
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_a_port_in_use_or_out_of_range_is_one_line(tmp_path: Path) -> None:
    """A port another server holds printed the URL (of that other server) and then uvicorn's
    `ERROR: [Errno 98] ...`, exit 3; --port 99999 printed a traceback and hung."""
    import os
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        out = CliRunner().invoke(main, ["ui", "--port", str(port), "--local-only"])
    assert out.exit_code == 1, out.output
    assert f"127.0.0.1:{port} is in use" in out.output and "--port" in out.output
    assert "kubetune ui: http" not in out.output and "ERROR" not in out.output
    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    bad = subprocess.run([sys.executable, "-m", "launcher", "ui", "--port", "99999"],
                         capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "99999" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # a `launcher ui` process: 1.9 s on a quiet machine, 5.5 s at load 6
def test_port_0_prints_the_port_it_got(tmp_path: Path) -> None:
    """`launcher ui --port 0` printed http://127.0.0.1:0/, an address nobody can open."""
    import os
    import re
    import signal

    env = {**os.environ, "KUBETUNE_HOME": str(tmp_path / "home")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "launcher", "ui", "--port", "0", "--local-only"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        found = re.match(r"kubetune ui: (http://127\.0\.0\.1:(\d+)/) ", line)
        assert found and int(found.group(2)) > 0, line
        status, page, _ = request(found.group(1))
        assert status == 200 and "kubetune-csrf" in page
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_an_ended_runs_row_is_kept_until_the_run_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The row of an ended run is not read from storage again on every poll, but a resumed
    attempt (same config, same run) shows its own progress."""
    import time

    from launcher.backends.local import LocalBackend
    from launcher.ui.configs import reload_reference
    from launcher.ui.runs import Runs
    from launcher.ui.submit import start_training

    script = tmp_path / "stand_in.py"
    script.write_text(
        "import json, os, sys, time, yaml\n"
        "out = yaml.safe_load(open(sys.argv[1]))['base_output_dir']\n"
        "os.makedirs(out, exist_ok=True)\n"
        "step = int(open(os.environ['STEP_FILE']).read())\n"
        "json.dump({'state': 'running', 'step': step}, open(out + '/progress.json', 'w'))\n"
        "time.sleep(float(os.environ.get('STAND_IN_SLEEP', '0')))\n"
        "sys.exit(1 if step == 5 else 0)\n"
    )
    step_file = tmp_path / "step"
    step_file.write_text("5")
    runs = Runs(local=LocalBackend(tmp_path / "home", [sys.executable, str(script)]))
    values = reload_reference(QUICKSTART.read_text(), "q", QUICKSTART.parent)["values"]
    values["base_output_dir"] = str(tmp_path / "out")
    settings = UiSettings(local_only=True)

    def row_when(phase: str) -> dict[str, Any]:
        deadline = time.monotonic() + 60
        while True:
            rows = runs.listing()["runs"]
            if rows and rows[0]["phase"] == phase:
                return rows[0]
            assert time.monotonic() < deadline, rows
            time.sleep(0.1)

    monkeypatch.setenv("STEP_FILE", str(step_file))
    start_training(values, target="local", sweeps=[], replace=False, runs=runs, settings=settings)
    assert row_when("Failed")["step"] == 5
    (tmp_path / "out" / "progress.json").write_text('{"state": "failed", "step": 6}')
    assert row_when("Failed")["step"] == 5  # kept: not read again
    step_file.write_text("9")
    monkeypatch.setenv("STAND_IN_SLEEP", "2")
    result = start_training(values, target="local", sweeps=[], replace=False, runs=runs,
                            settings=settings)  # fmt: skip
    assert "error" not in result, result
    assert row_when("Running")["step"] in (None, 6, 9)
    assert row_when("Succeeded")["step"] == 9


def test_without_a_kube_context_the_runs_say_so_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from launcher.ui.runs import NO_CLUSTER, Runs

    monkeypatch.setenv("HOME", str(tmp_path / "user"))  # no ~/.kube/config
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    for name in ("KUBECONFIG", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert Runs().listing() == {"runs": [], "messages": [NO_CLUSTER]}
    # Start Training with "the cluster" as the target: why not, and what to pick instead (it
    # said "...: showing the runs on this machine", the runs list's words)
    with pytest.raises(UserError) as err:
        Runs().backend("cluster")
    assert "showing the runs" not in str(err.value)
    assert "no cluster configured" in str(err.value) and "this machine" in str(err.value)


def test_a_run_whose_config_no_longer_validates_is_still_listed(tmp_path: Path) -> None:
    """An old run whose stored config the schema no longer accepts (a field since removed)
    stays in the list, with why its progress cannot be read, instead of hiding every run."""
    from ui_support import fake_local_run

    from launcher.backends.local import LocalBackend
    from launcher.ui.runs import Runs

    home = tmp_path / "home"
    fake_local_run(home, tmp_path / "out", "fine")
    fake_local_run(home, tmp_path / "out", "old")
    stored = home / "runs" / "old" / "config.yaml"
    stored.write_text(stored.read_text() + "a_field_since_removed: 1\n")
    rows = {r["run"]: r for r in Runs(local=LocalBackend(home), local_only=True).listing()["runs"]}
    assert rows["fine"]["step"] == 40 and rows["fine"]["phase"] == "Succeeded"
    assert "a_field_since_removed" in rows["old"]["progress_error"]
    assert rows["old"]["phase"] == "Succeeded"


def test_a_cluster_only_ui_offers_and_runs_nothing_on_its_own_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's in-cluster UI (`--cluster-only`): no 'this machine' target, and a local
    submit is refused in one line."""
    monkeypatch.setenv("KUBETUNE_HOME", str(tmp_path / "home"))
    settings = settings_for("127.0.0.1", 0, [tmp_path], cluster_only=True)
    with serve_in_thread(create_app(settings)) as url:
        _, page, _ = request(url + "/")
        assert 'value="local"' not in page and 'value="cluster"' in page
        post = {"X-Kubetune-CSRF": csrf_of(page), "Content-Type": "application/json"}
        values = __import__("yaml").safe_load(QUICKSTART.read_text())
        values["base_output_dir"] = str(tmp_path / "out")
        status, text, _ = request(url + "/api/submit", {"values": values, "target": "local"}, post)
        assert "runs nothing on its own machine" in json.loads(text)["error"]
        assert not (tmp_path / "home" / "runs").exists()
    assert CliRunner().invoke(main, ["ui", "--local-only", "--cluster-only"]).exit_code == 2


def test_a_run_with_a_corrupt_run_json_is_listed_as_unreadable(tmp_path: Path) -> None:
    """The Runs tab lists a local run whose run.json is truncated as Unreadable with the file
    and the reason, and keeps listing the other runs (no message hides the whole list)."""
    from ui_support import fake_local_run

    from launcher.backends.local import LocalBackend
    from launcher.ui.runs import Runs

    home = tmp_path / "home"
    fake_local_run(home, tmp_path / "out", "fine")
    bad = home / "runs" / "broken" / "run.json"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"run": "broken", "pi')
    listing = Runs(local=LocalBackend(home), local_only=True).listing()
    rows = {r["run"]: r for r in listing["runs"]}
    assert listing["messages"] == [] and rows["fine"]["step"] == 40
    assert rows["broken"]["phase"] == "Unreadable" and rows["broken"]["done"]
    assert str(bad) in rows["broken"]["reason"] and "not valid JSON" in rows["broken"]["reason"]
