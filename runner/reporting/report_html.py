"""The run report as one self-contained HTML page: inline CSS and SVG charts, validation
thumbnails as data URIs, no script and nothing fetched. Pure: data in, text out. Torch-free."""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.humanize import count, duration
from kubetune.layout import describe_dataset, step_name

MAX_POINTS = 800
CHART_W, CHART_H, PAD = 640, 200, 44

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#1d2433;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.state{display:inline-block;padding:2px 8px;border-radius:10px;background:#e8edf5}
.state.completed{background:#d6f5dd}.state.failed{background:#fbd9d9}
.state.preempted{background:#fdf0c8}
table{border-collapse:collapse}td,th{border:1px solid #d5dbe5;padding:4px 8px;vertical-align:top}
th{background:#f3f5f9;text-align:left}.strip{overflow-x:auto;max-width:100%}
.strip tr>th:first-child{position:sticky;left:0;max-width:240px;z-index:1}
.strip img{display:block;height:96px}pre{background:#f6f8fa;padding:12px;overflow-x:auto}
.muted{color:#5d6b82}svg text{font:11px system-ui,sans-serif;fill:#5d6b82}
"""


@dataclass
class ValidationEntry:
    """One validation step: a thumbnail data URI per prompt (None if missing)."""

    step: int
    thumbs: list[str | None]
    grid_key: str


@dataclass
class ReportData:
    """Everything the page shows."""

    run: str
    pipeline_type: str
    state: str
    output_uri: str
    progress: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    validations: list[ValidationEntry] = field(default_factory=list)
    checkpoints: list[tuple[int, int, int]] = field(default_factory=list)
    """(step, files, bytes) of each complete checkpoint."""
    final_files: list[str] = field(default_factory=list)
    config_yaml: str = ""


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS)] + [points[-1]]


def svg_chart(title: str, points: list[tuple[float, float]], colour: str) -> str:
    """A line chart of (step, value) with min/max labels; a note when there is no data."""
    points = [(x, y) for x, y in points if y == y]  # drop NaN
    if not points:
        return f'<p class="muted">{esc(title)}: no data yet</p>'
    points = _thin(points)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 == y0:  # a flat line (a constant learning rate) sits mid-chart
        pad = abs(y0) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    w, h = CHART_W - 2 * PAD, CHART_H - 2 * PAD

    def xy(x: float, y: float) -> str:
        return f"{PAD + (x - x0) / (x1 - x0) * w:.1f},{PAD + h - (y - y0) / (y1 - y0) * h:.1f}"

    line = " ".join(xy(x, y) for x, y in points)
    return (
        f'<svg role="img" aria-label="{esc(title)}" width="{CHART_W}" height="{CHART_H}" '
        f'viewBox="0 0 {CHART_W} {CHART_H}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect x="{PAD}" y="{PAD}" width="{w}" height="{h}" fill="#fafbfd" stroke="#d5dbe5"/>'
        f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{line}"/>'
        f'<text x="{PAD}" y="{PAD - 10}">{esc(title)}</text>'
        f'<text x="4" y="{PAD + 4}">{y1:.4g}</text><text x="4" y="{PAD + h}">{y0:.4g}</text>'
        f'<text x="{PAD}" y="{CHART_H - 12}">step {x0:g}</text>'
        f'<text x="{PAD + w}" y="{CHART_H - 12}" text-anchor="end">step {x1:g}</text></svg>'
    )


def _when(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else duration(seconds)


def _number(value: Any, digits: int) -> str:
    """``digits`` significant digits for a person; "-" when absent."""
    return "-" if value is None else f"{float(value):.{digits}g}"


def _resumed(p: dict[str, Any]) -> str:
    step = p.get("resumed_from")
    if step is None:
        return "no: this attempt started at step 0"
    return f"yes: from checkpoint {step_name(step)} (step {step})"


def _dataset(p: dict[str, Any]) -> str:
    if p.get("dataset_examples") is None:
        return "-"
    return describe_dataset(p["dataset_examples"], p.get("dataset_buckets") or {})


def summary_table(data: ReportData) -> str:
    p, hist = data.progress, data.history
    started = hist[0].get("time") if hist else None
    last = hist[-1].get("time") if hist else None
    rows = [
        ("state", f'<span class="state {esc(data.state)}">{esc(data.state)}</span>'),
        ("step", esc(f"{p.get('step', '-')} / {p.get('total_steps', '-')}")),
        ("loss (last log line)", esc(_number(p.get("loss"), 4))),
        ("images / s", esc(_number(p.get("images_per_second"), 3))),
        ("first log line", esc(_when(started))),
        ("last log line", esc(_when(last))),
        ("elapsed (first to last line)", esc(_duration(last - started if hist else None))),
        ("ETA", esc(_duration(p.get("eta_seconds")))),
        ("resumed", esc(_resumed(p))),
        ("dataset", esc(_dataset(p))),
        ("outputs", esc(data.output_uri)),
    ]
    if p.get("error"):  # a failed run: what ended it, and its exit status
        code = p.get("exit_code")
        rows.insert(1, ("error", esc(p["error"] + (f" (exit code {code})" if code else ""))))
    return "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def validation_table(data: ReportData) -> str:
    """Rows = prompts, columns = validation steps (newest last), each cell a thumbnail."""
    if not data.validations:
        return '<p class="muted">no validation images yet</p>'
    head = "".join(
        f'<th><a href="{esc(v.grid_key)}">step {v.step}</a></th>' for v in data.validations
    )
    rows = []
    for i, prompt in enumerate(data.prompts or [""]):
        cells = []
        for v in data.validations:
            uri = v.thumbs[i] if i < len(v.thumbs) else None
            alt = f"step {v.step}, prompt {i}"
            cells.append(f'<td><img src="{uri}" alt="{esc(alt)}"></td>' if uri else "<td>-</td>")
        rows.append(f"<tr><th>{esc(prompt)}</th>{''.join(cells)}</tr>")
    return f'<div class="strip"><table><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table></div>'


def checkpoint_list(checkpoints: Sequence[tuple[int, int, int]], final: Sequence[str]) -> str:
    items = [f"<li>step {s}: {count(n, 'file')}, {b / 1e6:.1f} MB</li>" for s, n, b in checkpoints]
    items += [f"<li>final/{esc(name)}</li>" for name in final]
    return f"<ul>{''.join(items)}</ul>" if items else '<p class="muted">none yet</p>'


def render(data: ReportData) -> str:
    """The whole page."""
    loss = [(r["step"], r["loss"]) for r in data.history if r.get("loss") is not None]
    lr = [(r["step"], r["lr"]) for r in data.history if r.get("lr") is not None]
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>kubetune: {esc(data.run)}</title>'
        f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body>'
        f"<h1>{esc(data.run)}</h1><p class='muted'>{esc(data.pipeline_type)} run report, "
        f"written by kubetune at each validation and at the end</p>"
        f"{summary_table(data)}<h2>Loss and learning rate</h2>"
        f"{svg_chart('loss', loss, '#1f6feb')}{svg_chart('learning rate', lr, '#bf5b04')}"
        f"<h2>Validation</h2>{validation_table(data)}"
        f"<h2>Checkpoints kept</h2>{checkpoint_list(data.checkpoints, data.final_files)}"
        f"<h2>Resolved config</h2><pre>{esc(data.config_yaml)}</pre></body></html>\n"
    )
