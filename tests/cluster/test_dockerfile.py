"""Static checks of the Dockerfile (no image can be pulled or built on these machines)."""

from __future__ import annotations

import re
from pathlib import Path

from launcher.manifests import POD_CACHE_ENV, RUNNER_UID

ROOT = Path(__file__).parents[2]
TEXT = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", TEXT)
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def _args() -> dict[str, str]:
    return dict(v.split("=", 1) for k, v in _instructions() if k == "ARG" and "=" in v)


def test_base_image_is_pinned() -> None:
    froms = [v for k, v in _instructions() if k == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        image = re.sub(r"\$\{(\w+)\}", lambda m: _args()[m.group(1)], image).split()[0]
        assert "@sha256:" in image or re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]), image
        assert not image.endswith(":latest"), image
        assert "cuda" in image and "runtime" in image
    assert "latest" not in TEXT


def test_torch_is_pinned_and_train_extra_installed() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", _args()["TORCH_VERSION"])
    runs = " ".join(v for k, v in _instructions() if k == "RUN")
    assert '"torch==${TORCH_VERSION}"' in runs and '".[train,gpu,ui]"' in runs


def test_runs_as_the_jobs_non_root_uid() -> None:
    users = [v for k, v in _instructions() if k == "USER"]
    assert users and users[-1].split(":")[0] == str(RUNNER_UID) != "0"


def test_entrypoint_and_cache_paths_match_the_job() -> None:
    assert ("ENTRYPOINT", '["python", "-m", "runner"]') in _instructions()
    env = " ".join(v for k, v in _instructions() if k == "ENV")
    for name in ("HF_HOME", "TORCH_HOME", "XDG_CACHE_HOME", "HOME"):
        assert f"{name}={POD_CACHE_ENV[name]}" in env


def test_dockerignore_sends_only_what_the_dockerfile_copies() -> None:
    """The build context is an allow-list: everything is ignored except the paths the
    Dockerfile COPYs, so a CI checkout's venvs (gigabytes) never reach the daemon."""
    patterns = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {p[1:] for p in patterns if p.startswith("!")}
    copied = {src for k, v in _instructions() if k == "COPY" for src in v.split()[:-1]}
    assert allowed == copied == {"pyproject.toml", "README.md", "kubetune", "runner", "launcher"}
    assert "**/__pycache__" in patterns[patterns.index("!launcher") :]


def test_the_image_can_build_compiled_kernels() -> None:
    """compile_unet: Triton builds its kernels with a C compiler against the Python headers;
    the image installs both, and the local cluster's base (APT_PACKAGES= there) has them
    too. The cluster tier runs the check inside the image (test_cluster_image.py)."""
    packages = _args()["APT_PACKAGES"].strip('"').split()
    assert {"build-essential", "python3-dev"} <= set(packages)
    script = (ROOT / "tests" / "cluster" / "local-cluster.sh").read_text()
    include = re.search(r"--include=(\S+)", script)
    assert include and {"gcc", "libc6-dev", "python3-dev"} <= set(include.group(1).split(","))
