"""The `launcher ui` test harness: the real server (uvicorn in a thread) and a real browser
(Debian's chromium driven by selenium through chromium-driver)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from browser import FLAGS, find_chromium


def chromedriver() -> str | None:
    return shutil.which("chromedriver")


@contextlib.contextmanager
def browser(width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """A headless chromium session (selenium), closed on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_chromium() or "chromium"
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        if not flag.startswith(("--enable-logging", "--v=")):
            options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="kubetune-ui-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(chromedriver()))
        try:
            yield driver
        finally:
            driver.quit()


def wait_for(driver: Any, script: str, timeout: float = 30.0) -> Any:
    """Poll a JavaScript expression until it is truthy; return its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(
        lambda d: d.execute_script(f"return {script}")
    )


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def field(driver: Any, path: str) -> Any:
    """The visible widget row of a config path in the shown tab."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, f'.tab:not([hidden]) .field[data-path="{path}"]')
    shown = [r for r in rows if r.is_displayed() or r.get_attribute("hidden") is None]
    assert shown, f"no widget for {path}"
    return shown[0]


SCREENSHOTS_ENV = "KUBETUNE_UI_SCREENSHOTS"


def screenshot(driver: Any, name: str) -> Path:
    """Save the page as `name`: into the folder KUBETUNE_UI_SCREENSHOTS names (docs/img
    refreshes the screenshots in docs/ui.md), else a temporary folder."""
    folder = Path(os.environ.get(SCREENSHOTS_ENV) or tempfile.gettempdir())
    folder.mkdir(parents=True, exist_ok=True)
    assert driver.save_screenshot(str(folder / name)), name
    return folder / name


def fake_local_run(
    home: Path,
    outputs: Path,
    name: str,
    *,
    labels: dict[str, str] | None = None,
    prompts: list[str] | None = None,
    thumbs: dict[int, int] | None = None,
    step: int = 40,
    exit_code: int | None = 0,
    pid: int = 2**22 + 1,
    final: bool = False,
    report: bool = False,
) -> Path:
    """A finished local run written as LocalBackend writes one (run.json, config.yaml,
    exit_code) with its outputs: progress.json and, per {step: prompts}, validation
    thumbnails (real JPEGs). Returns its output folder. For listings and views only: no
    training happened. `exit_code` None and a live `pid`: a running run; non-zero: a failed
    one; `final` writes final/ with its manifest, `report` a report.html."""
    import io
    import json
    import time

    import yaml
    from PIL import Image

    from kubetune.config import config_hash, config_to_yaml, parse_config
    from kubetune.layout import PROGRESS_KEY, REPORT_KEY, ProgressRecord, thumb_key
    from launcher.manifests import job_name, run_labels

    root = Path(__file__).resolve().parent.parent
    data = yaml.safe_load((root / "examples" / "quickstart.yaml").read_text())
    data["data_loader"]["dataset"]["dataset_dir"] = str(root / "examples" / "sample_data")
    data.update(base_output_dir=str(outputs / name), job={"name": name, "gpus": 0})
    data["job"]["labels"] = labels or {}
    if prompts is not None:
        data["validation_prompts"] = prompts
    cfg = parse_config(yaml.safe_dump(data))
    run_dir = home / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))
    if exit_code is not None:
        (run_dir / "exit_code").write_text(f"{exit_code}\n")
    info = {"run": name, "job_name": job_name(cfg), "config_hash": config_hash(cfg),
            "output_uri": cfg.base_output_dir, "pid": pid, "command": [],
            "started": time.time(), "labels": run_labels(cfg)}  # fmt: skip
    (run_dir / "run.json").write_text(json.dumps(info))
    out = Path(cfg.base_output_dir)
    out.mkdir(parents=True)
    state = {None: "running", 0: "completed"}.get(exit_code, "failed")
    total, eta = (step, 0.0) if exit_code == 0 else (2 * step, 95.0)
    record = ProgressRecord(state=state, step=step, total_steps=total, loss=0.125,
                            images_per_second=12.5, eta_seconds=eta)  # fmt: skip
    (out / PROGRESS_KEY).write_bytes(record.to_bytes())
    if final:
        _write_final(out, step)
    if report:
        (out / REPORT_KEY).write_text("<!DOCTYPE html><title>report</title><p>a report")
    for at, count in (thumbs or {}).items():
        for i in range(count):
            jpeg = io.BytesIO()
            Image.new("RGB", (64, 32), (40 * i % 255, 90, 160)).save(jpeg, "JPEG")
            path = out / thumb_key(at, i)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg.getvalue())
    return out


def _write_final(out: Path, step: int) -> None:
    """final/ as the runner publishes it: one weights file, then its manifest."""
    from kubetune.checkpoint.manifest import Manifest, file_entry
    from kubetune.layout import FINAL, final_manifest_key, utc_now

    (out / FINAL).mkdir(parents=True)
    (out / FINAL / "lora.safetensors").write_bytes(b"weights" * 100)
    entries = (file_entry(out / FINAL, "lora.safetensors"),)
    manifest = Manifest(step, utc_now(), entries, {"weights": ["lora.safetensors"]})
    (out / final_manifest_key()).write_bytes(manifest.to_bytes())
