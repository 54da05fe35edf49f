"""A run that needs the Hugging Face Hub and cannot reach it loads from the local cache only
(HF_HUB_OFFLINE=1), decided once before the ML libraries load: huggingface_hub otherwise
retries each file for ~45 s with no network before kubetune's message (measured here, where
the Hub does not resolve: 43.6 s for one model_index.json)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from kubetune.config import parse_config
from runner.models.hub_reach import go_offline_if_unreachable, hub_names, reachable

ROOT = Path(__file__).resolve().parents[2]


def _cfg(**fields: object):  # noqa: ANN202
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["data_loader"]["dataset"]["dataset_dir"] = str(ROOT / "examples" / "sample_data")
    data.update(fields)
    return parse_config(yaml.safe_dump(data))


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_reachable_asks_the_endpoint_once() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        assert reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    started = time.monotonic()
    assert not reachable(f"http://127.0.0.1:{_closed_port()}")
    assert not reachable("https://no-such-host.invalid")
    assert time.monotonic() - started < 10


def test_only_hub_names_are_asked_about() -> None:
    assert hub_names(_cfg()) == []  # builtin:tiny-sd
    cfg = _cfg(vae_model="madebyollin/sdxl-vae-fp16-fix")
    assert hub_names(cfg) == ["vae_model: madebyollin/sdxl-vae-fp16-fix"]


def test_an_unreachable_hub_means_the_cache_only() -> None:
    cfg = _cfg(vae_model="madebyollin/sdxl-vae-fp16-fix")
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    note = go_offline_if_unreachable(cfg, env)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert note is not None and "cannot be reached" in note and "sdxl-vae-fp16-fix" in note
    assert go_offline_if_unreachable(_cfg(), {"HF_ENDPOINT": env["HF_ENDPOINT"]}) is None
    offline = {"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": env["HF_ENDPOINT"]}
    assert go_offline_if_unreachable(cfg, offline) is None  # already chosen: not asked
    proxied = {"HTTPS_PROXY": "http://proxy.example:3128", "HF_ENDPOINT": env["HF_ENDPOINT"]}
    assert go_offline_if_unreachable(cfg, proxied) is None  # through a proxy: not ours to ask
    assert "HF_HUB_OFFLINE" not in proxied


@pytest.mark.slow
def test_a_run_with_an_unreachable_hub_fails_at_once(tmp_path: Path) -> None:
    """The real runner: an uncached Hub model with the Hub unreachable exits 2 with the
    'cannot be reached ... not in the local cache' line, without the retries."""
    data = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    data["base_output_dir"] = str(tmp_path / "out")
    data["data_loader"]["dataset"]["dataset_dir"] = str(ROOT / "examples" / "sample_data")
    data["model"] = "kubetune-tests/not-cached-anywhere"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "HF_HOME": str(tmp_path / "hf"), "KUBETUNE_HOME": str(tmp_path / "home")}  # fmt: skip
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                 "ALL_PROXY", "all_proxy"):  # fmt: skip
        env.pop(name, None)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "runner", str(config)], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    assert "cannot be reached" in out.stderr and "Retry" not in out.stderr
    assert time.monotonic() - started < 120
