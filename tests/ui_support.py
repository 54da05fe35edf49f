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
