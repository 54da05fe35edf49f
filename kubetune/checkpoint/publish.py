"""How a checkpoint is published: local folder → store, data first and ``manifest.json`` last.

A checkpoint ``<prefix>/step-000200/`` exists for readers, resume and pruning only once its
manifest (every file with size and sha256) has landed. Uploads run in one background thread
(at most one in flight: a second save waits, so a slow store slows training instead of
growing memory). It retries nothing itself: give it a
``kubetune.storage.run_store.RunStore`` (the one retry layer) for a store that can fail
transiently. After a manifest lands, the oldest complete checkpoints beyond
``max_checkpoints`` are deleted (manifest
first, then data) and manifest-less leftovers older than the newest checkpoint are removed.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kubetune.checkpoint.manifest import (
    CorruptCheckpoint,
    FileEntry,
    Manifest,
    NoValidCheckpoint,
    file_entry,
    sha256_file,
)
from kubetune.humanize import count
from kubetune.layout import (
    CHECKPOINTS,
    MANIFEST,
    SetAsideCheckpoint,
    parse_step_name,
    set_aside_key,
    step_name,
    utc_now,
)
from kubetune.storage import ObjectStore, check_key, join_key

log = logging.getLogger(__name__)
SET_ASIDE_NOTE = "set-aside.json"


@dataclass(frozen=True)
class Restored:
    """The checkpoint a run resumes from, and the newer ones set aside on the way."""

    step: int
    folder: Path
    manifest: Manifest
    set_aside: list[SetAsideCheckpoint]


def _local_files(local_dir: Path) -> list[str]:
    """Relative POSIX paths of every file under ``local_dir`` (which must exist)."""
    if not local_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder {local_dir} does not exist")
    files = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    if MANIFEST in files:
        raise ValueError(f"{local_dir}: a checkpoint may not contain its own {MANIFEST}")
    return files


def publish_folder(
    store: ObjectStore,
    local_dir: Path,
    prefix: str,
    step: int,
    meta: dict[str, Any] | None = None,
    *,
    concurrency: int = 4,
) -> Manifest:
    """Upload every file of ``local_dir`` under ``prefix``, then ``<prefix>/manifest.json``
    last: the one place kubetune writes "data first, manifest last" (checkpoints and
    ``final/``). A folder published again is unpublished first (its manifest deleted), so a
    reader never pairs an old manifest with new files."""
    files = _local_files(local_dir)
    manifest_key = join_key(prefix, MANIFEST)
    if store.exists(manifest_key):
        store.delete([manifest_key])

    def upload(rel: str) -> FileEntry:
        entry = file_entry(local_dir, rel)
        store.put_file(join_key(prefix, rel), local_dir / rel)
        return entry

    with ThreadPoolExecutor(max(1, concurrency), "publish") as pool:
        entries = tuple(pool.map(upload, files))
    manifest = Manifest(step, utc_now(), entries, dict(meta or {}))
    store.put_bytes(manifest_key, manifest.to_bytes())
    return manifest


class CheckpointManager:
    """Publishes, lists, prunes and restores checkpoints under ``prefix`` of ``store``."""

    def __init__(
        self,
        store: ObjectStore,
        max_checkpoints: int | None,
        *,
        prefix: str = CHECKPOINTS,
        file_concurrency: int = 4,
    ) -> None:
        if max_checkpoints is not None and max_checkpoints < 1:
            raise ValueError("max_checkpoints must be >= 1 (or None to keep every checkpoint)")
        self.store = store
        self.max_checkpoints = max_checkpoints
        self.prefix = check_key(prefix.strip("/"))
        self.file_concurrency = file_concurrency
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.on_published: Callable[[int], None] | None = None
        """Called with the step once a manifest landed (e.g. a webhook); errors are logged."""

    def key(self, step: int, name: str = "") -> str:
        """Store key of ``name`` inside the checkpoint of ``step`` (the folder if empty)."""
        return join_key(self.prefix, step_name(step), name)

    # -- publishing ---------------------------------------------------------------------------

    def save_async(
        self, step: int, local_dir: str | Path, *, meta: dict[str, Any] | None = None
    ) -> None:
        """Upload ``local_dir`` as checkpoint ``step`` in the background.

        Waits first for the previous upload (back-pressure) and re-raises its error. The caller
        must not modify ``local_dir`` until ``wait()`` returns.
        """
        self.wait()

        def run() -> None:
            try:
                self._save(step, Path(local_dir), meta)
            except BaseException as exc:  # surfaced by wait()
                self._error = exc

        self._thread = threading.Thread(target=run, name=f"checkpoint-{step}")
        self._thread.start()

    def save(
        self, step: int, local_dir: str | Path, *, meta: dict[str, Any] | None = None
    ) -> Manifest:
        """Upload synchronously (after any upload in flight) and return the manifest."""
        self.wait()
        return self._save(step, Path(local_dir), meta)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; re-raise its error (once). False on timeout."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return False
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return True

    def _save(self, step: int, local_dir: Path, meta: dict[str, Any] | None) -> Manifest:
        started = time.monotonic()
        manifest = publish_folder(
            self.store, local_dir, self.key(step), step, meta, concurrency=self.file_concurrency
        )
        log.info(
            "checkpoint %s published (%s, %.1f MB, %.1fs)",
            self.store.url(self.key(step, MANIFEST)),
            count(len(manifest.files), "file"),
            manifest.total_bytes / 1e6,
            time.monotonic() - started,
        )
        self._announce(step)
        self.prune_best_effort()
        return manifest

    def _announce(self, step: int) -> None:
        if self.on_published is None:
            return
        try:
            self.on_published(step)
        except Exception as exc:  # noqa: BLE001 - a listener never breaks publishing
            log.warning("checkpoint step %d: on_published failed: %s", step, exc)

    # -- reading ------------------------------------------------------------------------------

    def _scan(self) -> dict[int, tuple[bool, list[str]]]:
        """Step → (has manifest, keys) for every ``step-NNNNNN/`` folder under the prefix."""
        groups: dict[int, tuple[bool, list[str]]] = {}
        base = self.prefix + "/"
        for obj in self.store.list(base + "step-"):
            folder, sep, rest = obj.key[len(base) :].partition("/")
            step = parse_step_name(folder)
            if step is None or not (sep and rest):
                continue
            has_manifest, keys = groups.setdefault(step, (False, []))
            keys.append(obj.key)
            if rest == MANIFEST:
                groups[step] = (True, keys)
        return groups

    def list_complete(self) -> list[int]:
        """Steps whose manifest exists, ascending."""
        return sorted(step for step, (complete, _) in self._scan().items() if complete)

    def is_complete(self, step: int) -> bool:
        """Whether the manifest of ``step`` exists."""
        key = self.key(step, MANIFEST)
        return bool(self.store.exists(key))

    def latest(self) -> int | None:
        """The newest complete checkpoint, or None."""
        complete = self.list_complete()
        return complete[-1] if complete else None

    def read_manifest(self, step: int) -> Manifest:
        """The manifest of ``step``; ``FileNotFoundError`` if that checkpoint is not complete."""
        key = self.key(step, MANIFEST)
        data = self.store.get_bytes(key)
        return Manifest.from_bytes(data, self.store.url(key))

    def restore(self, step: int, local_dir: str | Path) -> Manifest:
        """Download checkpoint ``step`` into ``local_dir``, verifying sizes and sha256."""
        manifest = self.read_manifest(step)
        local_dir = Path(local_dir)

        def fetch(entry: FileEntry) -> None:
            key, dest = self.key(step, entry.key), local_dir / entry.key
            for attempt in (1, 2):  # one re-download if the bytes do not match
                try:
                    self.store.get_file(key, dest)
                except FileNotFoundError:
                    if self.is_complete(step):
                        where = self.store.url(key)
                        raise CorruptCheckpoint(
                            f"checkpoint object {where} is missing although its manifest exists"
                        ) from None
                    raise  # pruned while we were reading it
                size, digest = dest.stat().st_size, sha256_file(dest)
                if (size, digest) == (entry.size, entry.sha256):
                    return
                log.warning(
                    "checkpoint object %s does not match its manifest (attempt %d)", key, attempt
                )
            raise CorruptCheckpoint(
                f"checkpoint object {self.store.url(key)} is corrupt: {size} bytes sha256 "
                f"{digest[:12]}…, manifest says {entry.size} bytes sha256 {entry.sha256[:12]}…"
            )

        with ThreadPoolExecutor(max(1, self.file_concurrency), "ckpt-download") as pool:
            list(pool.map(fetch, manifest.files))
        return manifest

    # -- self-healing resume -------------------------------------------------------------------

    def restore_newest_valid(self, root: str | Path, *, heal: bool = True) -> Restored | None:
        """Download the newest checkpoint that passes its manifest check into ``root/<step>``.

        Newer ones that fail it are set aside (moved, never deleted; only if ``heal``: one
        process of a multi-process run heals) once a valid one is found; if none is valid
        nothing is moved and ``NoValidCheckpoint`` names them all.
        """
        bad: list[tuple[int, str]] = []
        for step in reversed(self.list_complete()):
            folder = Path(root) / step_name(step)
            shutil.rmtree(folder, ignore_errors=True)
            try:
                manifest = self.restore(step, folder)
            except CorruptCheckpoint as exc:
                log.warning("checkpoint %s fails its manifest check: %s", step_name(step), exc)
                bad.append((step, f"{step_name(step)}: {exc}"))
                continue
            aside = [self.set_aside(s, why) for s, why in bad] if heal else []
            return Restored(step, folder, manifest, aside)
        if bad:
            found = "; ".join(why for _, why in bad)
            raise NoValidCheckpoint(
                f"no valid checkpoint to resume from ({found}); fix the objects or pass "
                "--force-restart to start over"
            )
        return None

    def set_aside(self, step: int, reason: str) -> SetAsideCheckpoint:
        """Move checkpoint ``step`` under ``checkpoints-set-aside/`` with a note saying why:
        copies first, then the manifest goes (the checkpoint stops existing), then the rest."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        dest = set_aside_key(step, stamp)
        source = self.key(step) + "/"
        keys = [o.key for o in self.store.list(source)]
        with tempfile.TemporaryDirectory(prefix="kubetune-set-aside-") as tmp:
            for key in keys:
                self._copy(key, f"{dest}/{key[len(source) :]}", Path(tmp) / "object")
        aside = SetAsideCheckpoint(step=step, reason=reason, moved_to=dest)
        note = aside.model_dump_json(indent=2).encode()
        self.store.put_bytes(f"{dest}/{SET_ASIDE_NOTE}", note)
        manifest_key = self.key(step, MANIFEST)
        self.store.delete([manifest_key])
        self.store.delete(keys)
        log.warning(
            "checkpoint %s set aside to %s: %s", step_name(step), self.store.url(dest), reason
        )
        return aside

    def _copy(self, src: str, dst: str, tmp: Path) -> None:
        self.store.get_file(src, tmp)
        self.store.put_file(dst, tmp)

    # -- pruning ------------------------------------------------------------------------------

    def prune_best_effort(self) -> list[int]:
        """``prune``, logging instead of raising: housekeeping never fails a run whose new
        checkpoint is already published (the next save prunes again)."""
        try:
            return self.prune()
        except Exception as exc:  # noqa: BLE001 - never fatal, whatever the store says
            log.warning(
                "pruning checkpoints failed (the run goes on; retried after the "
                "next checkpoint): %s",
                exc,
            )
            return []

    def prune(self) -> list[int]:
        """Delete complete checkpoints beyond ``max_checkpoints`` (never the newest) and
        manifest-less leftovers older than the newest complete one. Returns pruned steps."""
        groups = self._scan()
        complete = sorted(step for step, (done, _) in groups.items() if done)
        if not complete:
            return []
        keep = self.max_checkpoints or len(complete)
        doomed = complete[:-keep] if len(complete) > keep else []
        for step in doomed:
            manifest_key = self.key(step, MANIFEST)
            data = [k for k in groups[step][1] if k != manifest_key]
            self.store.delete([manifest_key])
            self.store.delete(data)
        leftovers = [s for s, (done, _) in groups.items() if not done and s < complete[-1]]
        for step in leftovers:
            self.store.delete(groups[step][1])
        if doomed or leftovers:
            log.info("pruned checkpoints %s, leftovers %s", doomed, leftovers)
        return doomed

    def delete_all(self) -> None:
        """Remove every checkpoint (manifests first), e.g. for a forced restart."""
        self.wait()
        groups = self._scan()
        manifests = [self.key(s, MANIFEST) for s, (done, _) in groups.items() if done]
        self.store.delete(manifests)
        rest = [k for _, keys in groups.values() for k in keys if k not in set(manifests)]
        self.store.delete(rest)
