"""Headless Chromium (Debian's `chromium`) for the report tests: a screenshot of a local
HTML file and the console errors the page raised."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
)
# Chromium logs page console messages as `...:CONSOLE(line)] "message", source: ...`; it logs
# uncaught exceptions and failed loads the same way.
_CONSOLE = re.compile(r":(INFO|WARNING|ERROR):CONSOLE[^\]]*\] \"(.*)\", source: (.*)$")


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(html: Path, png: Path, *, width: int = 1280, height: int = 1600,
               timeout_s: float = 120.0) -> list[str]:  # fmt: skip
    """Render ``html`` into ``png``; return the console messages the page produced."""
    binary = find_chromium()
    assert binary is not None, "chromium is not installed"
    with tempfile.TemporaryDirectory(prefix="kubetune-chromium-") as profile:
        proc = subprocess.run(
            [
                binary,
                *FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--screenshot={png}",
                html.resolve().as_uri(),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    assert png.is_file(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr}"
    return [f"{m.group(2)} ({m.group(3)})" for m in map(_CONSOLE.search, proc.stderr.splitlines())
            if m]  # fmt: skip
