"""Writes ``report.html`` into the run's store: gathers the history, the validation
thumbnails, the complete checkpoints and the resolved config, renders them with
``runner.reporting.report_html`` and puts the page (all-or-nothing). A failure is logged,
never raised: the report must not stop training. Torch-free."""

from __future__ import annotations

import base64
import io
import logging
from typing import Any

from kubetune.checkpoint.publish import CheckpointManager
from kubetune.layout import FINAL, MANIFEST, REPORT_KEY, VALIDATION, parse_thumb_key, validation_key
from kubetune.storage import ObjectStore
from runner.reporting.report_html import ReportData, ValidationEntry, render

log = logging.getLogger(__name__)


def thumbnail_jpeg(row: list[Any], height: int = 96) -> bytes:
    """One prompt's images (PIL) side by side, scaled to ``height`` px, as a small JPEG."""
    from PIL import Image  # the runner has Pillow; the launcher never calls this

    width = sum(max(1, round(im.width * height / im.height)) for im in row)
    strip = Image.new("RGB", (width, height))
    x = 0
    for image in row:
        w = max(1, round(image.width * height / image.height))
        strip.paste(image.convert("RGB").resize((w, height), Image.Resampling.LANCZOS), (x, 0))
        x += w
    buffer = io.BytesIO()
    strip.save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


class ReportWriter:
    """``publish(state, progress, history)`` re-renders and uploads the page. Thumbnails are
    read once and kept (a report stays cheap at 200 validation steps)."""

    def __init__(
        self,
        store: ObjectStore,
        *,
        run: str,
        pipeline_type: str,
        prompts: list[str],
        config_yaml: str,
    ) -> None:
        self.store, self.run, self.pipeline_type = store, run, pipeline_type
        self.prompts, self.config_yaml = prompts, config_yaml
        self._thumbs: dict[str, str] = {}

    def publish(self, state: str, progress: dict[str, Any], history: list[dict[str, Any]]) -> bool:
        """Render and put ``report.html``; False (logged) if that failed."""
        try:
            page = render(self.data(state, progress, history))
            self.store.put_bytes(REPORT_KEY, page.encode())
        except Exception as err:  # noqa: BLE001 - best effort: never fail training
            log.warning("run report not written: %s", str(err).splitlines()[0] if str(err) else err)
            return False
        return True

    def data(
        self, state: str, progress: dict[str, Any], history: list[dict[str, Any]]
    ) -> ReportData:
        return ReportData(
            run=self.run,
            pipeline_type=self.pipeline_type,
            state=state,
            output_uri=self.store.uri,
            progress=dict(progress),
            history=list(history),
            prompts=self.prompts,
            validations=self._validations(),
            checkpoints=self._checkpoints(),
            final_files=self._final_files(),
            config_yaml=self.config_yaml,
        )

    def _final_files(self) -> list[str]:
        """The finished run's files a user pulls (its manifest is kubetune's bookkeeping)."""
        names = (o.key[len(FINAL) + 1 :] for o in self.store.list(f"{FINAL}/"))
        return sorted(name for name in names if name != MANIFEST)

    def _validations(self) -> list[ValidationEntry]:
        found: dict[int, dict[int, str]] = {}
        for obj in self.store.list(f"{VALIDATION}/"):
            parsed = parse_thumb_key(obj.key)
            if parsed is not None:
                found.setdefault(parsed[0], {})[parsed[1]] = obj.key
        entries = []
        for step in sorted(found):
            keys = found[step]
            thumbs = [self._data_uri(keys[i]) if i in keys else None for i in range(max(keys) + 1)]
            entries.append(ValidationEntry(step, thumbs, validation_key(step, "grid.png")))
        return entries

    def _data_uri(self, key: str) -> str:
        if key not in self._thumbs:
            raw = self.store.get_bytes(key)
            self._thumbs[key] = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
        return self._thumbs[key]

    def _checkpoints(self) -> list[tuple[int, int, int]]:
        manager = CheckpointManager(self.store, None)
        rows = []
        for step in manager.list_complete():
            try:
                manifest = manager.read_manifest(step)
            except FileNotFoundError:  # pruned meanwhile
                continue
            rows.append((step, len(manifest.files), manifest.total_bytes))
        return rows
