"""Bad inputs beyond configs (``tests/data/bad/inputs/<case>/``) through the real entrypoints.

Each case must end with exactly one error line matching its ``message``, its exit status
(2 = user error, 1 = environment), no traceback, nothing written to the output location or
the dataset, and nothing submitted (the fake API server holds no Job, the local backend no
run); in this process it is also checked that no run lease was ever taken (a lease taken
and released leaves no object behind, so the output listing alone cannot tell). The fast
subset calls the entrypoints' ``main`` in this process; the reliability mark runs every
case as a real subprocess (``python -m runner`` / ``python -m launcher``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from data_fixtures import upload_tree
from k8s_fake import FakeKube
from kube_configs import TEST_SECRET_KEY
from relsupport import REPO, figure, held_closed_port, runner_env

CORPUS = REPO / "tests" / "data" / "bad" / "inputs"
CASES = sorted(p.name for p in CORPUS.iterdir() if (p / "case.yaml").is_file())
BASE: dict[str, Any] = {
    "type": "SD_LORA", "seed": 1, "base_output_dir": "@OUT@/bad-run", "model": "@MODEL@",
    "hf_variant": None, "weight_dtype": "float32", "mixed_precision": "no",
    "data_loader": {"type": "IMAGE_CAPTION_SD_DATA_LOADER", "resolution": 64,
                    "dataset": {"type": "IMAGE_CAPTION_DIR_DATASET",
                                "dataset_dir": "@CASE@/data"}},
    "train_batch_size": 1, "max_train_steps": 2, "save_every_n_steps": 1,
}  # fmt: skip
ERROR_LINE = {"runner": re.compile(r"^kubetune: error: (.*)$"),
              "launcher": re.compile(r"^error: (.*)$")}  # fmt: skip
RESULTS: dict[str, str] = {}
SUBPROCESS_TIMEOUT_S = 240
"""Below the tests' own timeouts, so a slow case fails with its output, not a bare kill."""
# In-process only: a library log handler still bound to an earlier test's closed capture
# stream prints this block; it cannot happen in a real process (the subprocess tests check).
STALE_STREAM = re.compile(
    r"--- Logging error ---\n(?:(?!--- Logging error ---).)*?"
    r"I/O operation on closed file\.\n.*?Arguments: \(\)\n",
    re.S,
)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "type" not in value:
            out[key] = merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value) if key != "dataset" else value
        else:
            out[key] = value
    return out


def fill(obj: Any, values: dict[str, str]) -> Any:
    if isinstance(obj, str):
        for key, value in values.items():
            obj = obj.replace(f"@{key}@", value)
        return obj
    if isinstance(obj, dict):
        return {k: fill(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [fill(v, values) for v in obj]
    return obj


@dataclass
class Prepared:
    spec: dict[str, Any]
    work: Path
    config: Path
    env: dict[str, str]
    out: Path
    prefix: str
    kube: FakeKube | None


def test_corpus_files_match_their_generator(tmp_path: Path) -> None:
    """The committed files are what ``make_bad_inputs.py`` writes (regenerate if not)."""
    sys.path.insert(0, str(CORPUS.parent))
    import make_bad_inputs

    assert make_bad_inputs.build(tmp_path / "inputs") == make_bad_inputs.snapshot(CORPUS)
    assert len(CASES) == len(make_bad_inputs.CASES) >= 30


def _prepare(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Prepared:
    spec = yaml.safe_load((CORPUS / name / "case.yaml").read_text())
    work = tmp_path / "case"
    shutil.copytree(CORPUS / name, work)
    port, holder = held_closed_port()  # refused until the test ends, never someone else's
    request.addfinalizer(holder.close)
    values = {"CASE": str(work), "OUT": str(tmp_path / "out"), "SECRET": TEST_SECRET_KEY,
              "MODEL": str(request.getfixturevalue("tiny_sd_dir")),
              "CLOSED": f"http://127.0.0.1:{port}", "BUCKET": "kubetune",
              "ENDPOINT": "http://127.0.0.1:9000"}  # fmt: skip
    env: dict[str, str] = {"KUBETUNE_HOME": str(tmp_path / "home"),
                           "KUBETUNE_WORK_DIR": str(tmp_path / "scratch")}  # fmt: skip
    kube = None
    prefix = f"bad-{name}-{uuid.uuid4().hex[:8]}"
    if "s3" in spec["needs"]:
        server = request.getfixturevalue("s3_server")
        values.update(ENDPOINT=server.endpoint, BUCKET=request.getfixturevalue("s3_shared_bucket"),
                      WRONG=server.wrong_secret_key, RO_KEY=server.readonly_access_key,
                      RO_SECRET=server.readonly_secret_key, DATA=f"data-{prefix}")  # fmt: skip
        env.update(server.env())
    if "s3-data" in spec["needs"]:  # the dataset itself on S3, beside (not under) the run
        upload_tree(server.client(), values["BUCKET"], values["DATA"], work / "data")
    if "kube" in spec["needs"]:
        kube, kubeconfig = request.getfixturevalue("fake_kube")
        closed = kube.write_kubeconfig(tmp_path / "closed-kubeconfig")
        closed.write_text(closed.read_text().replace(kube.url, values["CLOSED"]))
        values["CLOSED_KUBECONFIG"] = str(closed)
        env["KUBECONFIG"] = str(kubeconfig)
    env.update(fill(spec["env"], values))
    config = fill(merge(BASE, spec["config"]), values)
    if "storage" in config and config["storage"].get("prefix") == "bad":
        config["storage"]["prefix"] = prefix
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return Prepared(spec, work, path, env, tmp_path / "out", prefix, kube)


def _command(p: Prepared) -> tuple[str, list[str]]:
    kind = p.spec["entrypoint"]
    if kind == "runner":
        return "runner", ["-m", "runner", str(p.config), *p.spec["args"]]
    extra = ["--local"] if kind == "submit-local" else []
    verb = "render" if kind == "render" else "submit"
    return "launcher", ["-m", "launcher", verb, *extra, str(p.config), *p.spec["args"]]


def _run_subprocess(p: Prepared) -> tuple[int, str]:
    """Run the case; its stdout and stderr are echoed to the test's captured output, so a
    failure (or a timeout, with what the process wrote so far) shows them."""
    _, argv = _command(p)
    try:
        proc = subprocess.run(
            [sys.executable, *argv],
            env=runner_env(p.env),
            cwd=p.work,
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as exc:
        _echo(exc.stdout, exc.stderr)
        pytest.fail(f"{argv} still running after {SUBPROCESS_TIMEOUT_S} s (output above)")
    _echo(proc.stdout, proc.stderr)
    return proc.returncode, proc.stderr


def _echo(stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    for name, text in (("stdout", stdout), ("stderr", stderr)):
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        print(f"--- subprocess {name} ---\n{text or ''}", file=sys.stderr)


def _run_in_process(p: Prepared, monkeypatch: pytest.MonkeyPatch,
                    capfd: pytest.CaptureFixture[str]) -> tuple[int, str]:  # fmt: skip
    """The same ``main`` functions, without paying the interpreter start-up per case."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in p.env.items():
        if value:
            monkeypatch.setenv(key, value)
        else:
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(p.work)
    tool, argv = _command(p)
    capfd.readouterr()
    if tool == "runner":
        from train_support import reset_accelerate

        from runner.__main__ import main as runner_main

        reset_accelerate()
        root = logging.getLogger()
        saved = root.handlers[:]
        root.handlers.clear()  # basicConfig must bind this test's stderr, not a stale one
        _rebind_stream_handlers()
        try:
            code = runner_main(argv[2:])
        finally:
            root.handlers[:] = saved
    else:
        from launcher.cli.main import main as launcher_main

        try:
            launcher_main.main(argv[2:], prog_name="launcher", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, STALE_STREAM.sub("", capfd.readouterr().err)


def _rebind_stream_handlers() -> None:
    """Library loggers (diffusers, transformers) keep the ``sys.stderr`` of the test that
    imported them; point them at the current one (a subprocess never needs this)."""
    for logger in [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]:
        for handler in logger.handlers:
            if type(handler) is logging.StreamHandler:
                handler.stream = sys.stderr  # setStream would flush the closed one


def _tree(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    return {p.relative_to(path).as_posix(): p.stat().st_size for p in path.rglob("*")
            if p.is_file()}  # fmt: skip


def _assert_only_complete_checkpoints(out: Path) -> None:
    """A run stopped mid-way by a bad image leaves only checkpoints whose manifest landed."""
    for folder in out.rglob("checkpoints/step-*"):
        assert (folder / "manifest.json").is_file(), f"half-written checkpoint {folder}"


def _check(name: str, p: Prepared, code: int, stderr: str, before: dict[str, int],
           request: pytest.FixtureRequest) -> None:  # fmt: skip
    tool, _ = _command(p)
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [m.group(1) for line in stderr.splitlines() if (m := ERROR_LINE[tool].match(line))]
    assert len(errors) == 1, f"expected one error line, got {errors}\n{stderr[-3000:]}"
    assert re.search(p.spec["message"], errors[0]), errors[0]
    assert code == p.spec["exit"], (code, errors[0])
    if p.spec.get("midrun"):
        _assert_only_complete_checkpoints(p.out)
    else:
        assert _tree(p.out) == {}, f"{name} wrote to its output location: {_tree(p.out)}"
    assert _tree(p.work) == before, f"{name} changed its dataset"
    if "s3" in p.spec["needs"]:
        client = request.getfixturevalue("s3_server").client()
        bucket = request.getfixturevalue("s3_shared_bucket")
        listed = client.list_objects_v2(Bucket=bucket, Prefix=p.prefix).get("KeyCount", 0)
        assert listed == 0, f"{name} wrote {listed} objects under s3://{bucket}/{p.prefix}"
    if p.kube is not None:
        with p.kube.cond:
            made = [k for k in p.kube.objects if k[0] in ("jobs", "configmaps", "pods")]
        assert made == [], f"{name} submitted {made}"
    home = Path(p.env["KUBETUNE_HOME"]) / "runs"
    assert not home.exists() or not any(home.iterdir()), f"{name} started a local run"
    RESULTS[name] = f"exit {code}: {errors[0][:100]}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", CASES)
@pytest.mark.slow
def test_bad_input_in_process(name: str, request: pytest.FixtureRequest, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch,
                              capfd: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from kubetune.storage.lease import Lease

    p = _prepare(name, request, tmp_path)
    before = _tree(p.work)
    leases: list[str] = []
    real_acquire = Lease.acquire

    def acquire(self: Lease, **kwargs: Any) -> Lease:
        taken = real_acquire(self, **kwargs)
        leases.append(self.store.uri)
        return taken

    monkeypatch.setattr(Lease, "acquire", acquire)
    code, stderr = _run_in_process(p, monkeypatch, capfd)
    _check(name, p, code, stderr, before, request)
    if not p.spec.get("midrun"):  # a bad dataset fails before the lease, not after
        assert leases == [], f"{name} took the run lease before failing: {leases}"


@pytest.mark.reliability
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", CASES)
def test_bad_input_subprocess(name: str, request: pytest.FixtureRequest,
                              tmp_path: Path) -> None:  # fmt: skip
    p = _prepare(name, request, tmp_path)
    before = _tree(p.work)
    code, stderr = _run_subprocess(p)
    _check(name, p, code, stderr, before, request)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["data-corrupt-image", "s3-unreachable-endpoint"])
@pytest.mark.slow
def test_bad_input_real_subprocess_sample(name: str, request: pytest.FixtureRequest,
                                          tmp_path: Path) -> None:  # fmt: skip
    """Two cases as real subprocesses in the fast subset too (interpreter, exit status)."""
    test_bad_input_subprocess(name, request, tmp_path)


@pytest.fixture(scope="module", autouse=True)
def _bad_input_figure() -> Iterator[None]:
    """Print the corpus figure once the module's cases ran (fast subset or full)."""
    yield
    if not RESULTS:
        return
    exits = Counter(text.split(":")[0] for text in RESULTS.values())
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(exits.items()))
    figure(
        "bad inputs",
        f"{len(RESULTS)}/{len(CASES)} cases rejected cleanly ({summary}); "
        "0 tracebacks, 0 writes, 0 submissions (plus 91 config cases in "
        "tests/test_kubetune/test_config.py)",
    )
