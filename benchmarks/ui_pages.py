"""`launcher ui` page timings in a real browser (headless chromium via selenium): the
Configure page ready (every training type's tab built from the schema) and the Runs page
with N local runs (progress.json each, some in sweeps) ready, plus the server-side time of
/api/runs and of building the app. No timing assertions: figures for docs/benchmarks.md.

Usage: python benchmarks/ui_pages.py [--runs 200] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def make_runs(home: Path, outputs: Path, count: int) -> None:
    """`count` finished local runs (progress.json each); every 4th is in one of 5 sweeps."""
    from ui_support import fake_local_run

    from launcher.sweeps import LABEL_SWEEP, PARAM_LABEL_PREFIX

    for i in range(count):
        labels = {}
        if i % 4 == 0:
            labels = {LABEL_SWEEP: f"sweep-{i % 5}", f"{PARAM_LABEL_PREFIX}rank": str(4 + i % 3)}
        fake_local_run(home, outputs, f"run-{i:03d}", labels=labels)


def timed_load(driver: object, url: str, ready: str, stamp: str) -> float:
    from ui_support import wait_for

    driver.get("about:blank")  # type: ignore[attr-defined]
    driver.get(url)  # type: ignore[attr-defined]
    wait_for(driver, ready, timeout=120)
    return float(wait_for(driver, f"window.kubetune.{stamp}")) / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kubetune-ui-bench-"))
    os.environ["KUBETUNE_HOME"] = str(work / "home")
    make_runs(work / "home", work / "outputs", args.runs)

    from ui_support import browser

    from launcher.ui.security import UiSettings
    from launcher.ui.server import create_app, serve_in_thread

    start = time.perf_counter()
    app = create_app(UiSettings(port=0, local_only=True))
    build = time.perf_counter() - start
    with serve_in_thread(app) as url, browser() as driver:
        api = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            with urllib.request.urlopen(url + "/api/runs", timeout=120) as response:
                rows = len(json.load(response)["runs"])
            api.append(time.perf_counter() - start)
        configure = [timed_load(driver, url + "/#configure", "document.body.dataset.ready",
                                "readyAt") for _ in range(args.repeat)]  # fmt: skip
        runs = [timed_load(driver, url + "/#runs", "document.body.dataset.runsReady",
                           "runsReadyAt") for _ in range(args.repeat)]  # fmt: skip
        tabs = driver.execute_script("return window.kubetune.state.tabs.length")
        widgets = driver.execute_script("return document.querySelectorAll('.field').length")
    print(f"app built (schema → forms of {tabs} types): {build:.2f} s")
    print(f"configure page ready ({tabs} tabs, {widgets} widgets): median "
          f"{statistics.median(configure):.3f} s, min {min(configure):.3f} s")  # fmt: skip
    print(f"/api/runs ({rows} runs, progress.json each): median {statistics.median(api):.3f} s, "
          f"min {min(api):.3f} s")  # fmt: skip
    print(f"runs page ready ({rows} runs): median {statistics.median(runs):.3f} s, "
          f"min {min(runs):.3f} s")  # fmt: skip
    print(f"machine load (1-min average): {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
