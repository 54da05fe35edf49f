"""The run report: the page's content and weight, the history it plots, and (with Debian's
`chromium`) a real headless browser rendering it without console errors."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from browser import find_chromium, screenshot
from PIL import Image

from kubetune.layout import HISTORY_KEY, REPORT_KEY, thumb_key
from kubetune.storage import open_store
from runner.reporting.history import History, read_history
from runner.reporting.report import ReportWriter, thumbnail_jpeg
from runner.reporting.report_html import ReportData, ValidationEntry, render, svg_chart

PROMPTS = ["a <b>bold</b> cat & a dog", "kbtn style, a red circle"]


def photo(seed: int, size: tuple[int, int] = (512, 640)) -> Image.Image:
    """A smooth, photo-like RGB image (gradients and blobs, not noise) of a real size."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = []
    for c in range(3):
        cx, cy, r = rng.uniform(0.2, 0.8, 3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.05 + 0.2 * r))
        channels.append(0.3 * (xx if c % 2 else yy) + 0.7 * blob * rng.uniform(0.5, 1))
    return Image.fromarray((np.clip(np.stack(channels, -1), 0, 1) * 255).astype(np.uint8))


def write_run(root: Path, validations: int, per_prompt: int = 2) -> ReportWriter:
    """A run folder with ``validations`` steps of thumbnails made from real-size images
    (six distinct strips, reused to keep the test fast)."""
    store = open_store(str(root))
    strips = [thumbnail_jpeg([photo(10 * k + j) for j in range(per_prompt)]) for k in range(6)]
    for v in range(1, validations + 1):
        for i in range(len(PROMPTS)):
            strip = strips[(v * len(PROMPTS) + i) % len(strips)]
            store.put_bytes(thumb_key(v * 10, i), strip)
    return ReportWriter(store, run="demo", pipeline_type="SD_LORA", prompts=PROMPTS,
                        config_yaml="type: SD_LORA\nseed: 1\n")  # fmt: skip


def history(n: int = 2000) -> list[dict[str, float]]:
    return [
        {
            "step": s,
            "loss": 0.2 + 0.1 * math.exp(-s / 300) + 0.01 * math.sin(s),
            "lr": 1e-4,
            "time": 1.7e9 + s,
        }  # fmt: skip
        for s in range(1, n + 1)
    ]


def test_page_is_self_contained_and_escapes_text(tmp_path: Path) -> None:
    writer = write_run(tmp_path / "run", validations=2)
    assert writer.publish("running", {"step": 20, "total_steps": 40, "loss": 0.25}, history(40))
    page = (tmp_path / "run" / REPORT_KEY).read_text()
    assert page.startswith("<!DOCTYPE html>") and "<polyline" in page
    assert page.count("data:image/jpeg;base64,") == 4  # 2 steps x 2 prompts
    assert "a &lt;b&gt;bold&lt;/b&gt; cat &amp; a dog" in page and "<b>bold" not in page
    for external in ("<script", "<link", 'src="http', "url(http", "@import"):
        assert external not in page
    assert 'href="validation/step-000020/grid.png"' in page


def test_two_hundred_validation_steps_stay_light(tmp_path: Path) -> None:
    writer = write_run(tmp_path / "run", validations=200, per_prompt=4)
    assert writer.publish("completed", {"step": 2000, "total_steps": 2000}, history())
    size = (tmp_path / "run" / REPORT_KEY).stat().st_size
    assert size < 12e6, f"{size / 1e6:.1f} MB"
    page = (tmp_path / "run" / REPORT_KEY).read_text()
    assert page.count("data:image/jpeg") == 400
    polyline = page.split("<polyline", 1)[1].split("/>", 1)[0]
    assert polyline.count(",") <= 801  # the curve is thinned, not 2000 points


def test_chart_without_data_says_so() -> None:
    assert "no data yet" in svg_chart("loss", [], "#000")
    assert "<polyline" in svg_chart("loss", [(1, 0.5)], "#000")  # one point: no division by 0


def test_history_round_trip_and_resume_truncation(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "run"))
    first = History(store)
    for step in (5, 10, 15):
        first.append(step=step, epoch=0, loss=0.123456789, lr=1e-4, images_per_second=3.0)
    first.publish()
    assert [r["step"] for r in read_history(store)] == [5, 10, 15]
    assert read_history(store)[0]["loss"] == 0.123457
    resumed = History(store, start_step=10)  # resumed from the step-10 checkpoint
    assert [r["step"] for r in resumed.records] == [5, 10]
    (tmp_path / "run" / HISTORY_KEY).write_text('{"step": 1}\nnot json\n')
    assert [r["step"] for r in read_history(store)] == [1]


# --- a real browser ------------------------------------------------------------------------


def _require_chromium() -> None:
    if find_chromium() is None:
        pytest.skip(
            "Debian's chromium is not installed (needs root: apt-get install -y chromium; "
            ".ci/run installs it)"
        )


def _blank(png: Path) -> bool:
    pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    return float(pixels.std()) < 2.0


def test_chromium_renders_the_report_without_console_errors(tmp_path: Path) -> None:
    _require_chromium()
    writer = write_run(tmp_path / "run", validations=12)
    writer.publish("completed", {"step": 120, "total_steps": 120, "loss": 0.2}, history(120))
    png = tmp_path / "report.png"
    messages = screenshot(tmp_path / "run" / REPORT_KEY, png)
    assert messages == []
    assert not _blank(png)
    image = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
    colours = {image.getpixel((x, y)) for x in range(0, image.width, 7)
               for y in range(0, image.height, 7)}  # fmt: skip
    assert len(colours) > 50  # text, the curve and the thumbnails, not one flat colour


def test_the_browser_check_catches_errors_and_blank_pages(tmp_path: Path) -> None:
    _require_chromium()
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>notDefined()</script></body></html>")
    messages = screenshot(bad, tmp_path / "bad.png")
    assert any("notDefined" in m for m in messages)
    assert _blank(tmp_path / "bad.png")


def test_render_handles_missing_thumbnails() -> None:
    data = ReportData("r", "SD_LORA", "running", "/tmp/r", prompts=["a", "b"],
                      validations=[ValidationEntry(10, ["data:image/jpeg;base64,AA", None],
                                                   "validation/step-000010/grid.png")])  # fmt: skip
    page = render(data)
    assert 'alt="step 10, prompt 0"' in page and 'alt="step 10, prompt 1"' not in page


def test_summary_numbers_are_rounded_for_people(tmp_path: Path) -> None:
    writer = write_run(tmp_path / "run", validations=1)
    progress = {"step": 40, "total_steps": 40, "loss": 0.8594766616821289,
                "images_per_second": 6.2071053484740295}  # fmt: skip
    assert writer.publish("completed", progress, history(40))
    page = (tmp_path / "run" / REPORT_KEY).read_text()
    assert "<td>0.8595</td>" in page and "<td>6.21</td>" in page
    assert "0.85947666" not in page


def test_the_final_weights_are_listed_without_the_manifest(tmp_path: Path) -> None:
    """The page lists the finished run's files (the weights a user pulls), not final/'s
    manifest.json, which is kubetune's own bookkeeping."""
    writer = write_run(tmp_path / "run", validations=1)
    writer.store.put_bytes("final/lora.safetensors", b"w")
    writer.store.put_bytes("final/manifest.json", b"{}")
    assert writer.publish("completed", {"step": 40, "total_steps": 40, "loss": 0.2}, history(40))
    page = (tmp_path / "run" / REPORT_KEY).read_text()
    assert "<li>final/lora.safetensors</li>" in page and "final/manifest.json" not in page
