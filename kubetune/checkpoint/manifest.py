"""The checkpoint manifest: the marker written last, listing every file with size and sha256.

Torch-free (the launcher reads it to verify ``launcher pull`` downloads). The format is
JSON with sorted keys: ``{"created", "files": [{"key", "sha256", "size"}], "meta", "step",
"version"}``; ``meta.weights`` names the user-facing files.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kubetune.errors import StorageError
from kubetune.storage import check_key


class CorruptCheckpoint(StorageError):
    """A published checkpoint failed its manifest check (bad bytes, missing object, bad
    manifest): resume sets it aside and falls back to an older one."""


class NoValidCheckpoint(StorageError):
    """Every published checkpoint failed its manifest check; nothing was moved."""


@dataclass(frozen=True)
class FileEntry:
    """One file of a checkpoint, relative to its step folder."""

    key: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    """The marker written last: a checkpoint exists once this object does."""

    step: int
    created: str
    files: tuple[FileEntry, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = 1

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_bytes(self) -> bytes:
        data = asdict(self)
        data["files"] = [asdict(f) for f in self.files]
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> Manifest:
        try:
            raw = json.loads(data)
            files = tuple(
                FileEntry(str(f["key"]), int(f["size"]), str(f["sha256"])) for f in raw["files"]
            )
            for f in files:
                check_key(f.key)
            return cls(
                int(raw["step"]),
                str(raw["created"]),
                files,
                dict(raw.get("meta") or {}),
                int(raw.get("version", 1)),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(f"unreadable checkpoint manifest {where}: {exc}") from exc


def sha256_file(path: Path) -> str:
    """Hex sha256 of a local file, read in 4 MiB chunks (the manifest's digest)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def file_entry(root: Path, rel: str) -> FileEntry:
    """Size and sha256 of ``root / rel`` as a manifest entry."""
    path = root / rel
    return FileEntry(rel, path.stat().st_size, sha256_file(path))
