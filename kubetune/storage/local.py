"""``LocalStore``: a local directory with object-store semantics (atomic writes through a
temp file + ``os.replace``; conditional writes through hard links and an flock)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

from kubetune.errors import StorageError, StorageUserError
from kubetune.storage.base import (
    Capability,
    MiB,
    ObjectInfo,
    StoreBase,
    check_key,
    check_prefix,
)

_TMP_PREFIX = ".kubetune-tmp-"


def _umask() -> int:
    """This process's umask, read without changing it (Linux's /proc), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file_beside(dest: Path, prefix: str = _TMP_PREFIX) -> tuple[int, str]:
    """A temp file in `dest`'s folder for an atomic write, with the mode `open()` would give
    `dest` (0o666 minus the umask; `mkstemp` alone makes it 0o600, unreadable to the
    machine's other users once renamed into place)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=dest.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, tmp


_COPY_BUFFER = 8 * MiB


@contextlib.contextmanager
def _local_errors(what: str) -> Iterator[None]:
    """Translate OS errors of the local store; ``FileNotFoundError`` passes through."""
    try:
        yield
    except FileNotFoundError:
        raise
    except (IsADirectoryError, NotADirectoryError) as exc:
        raise FileNotFoundError(errno.ENOENT, "no such object", what) from exc
    except PermissionError as exc:
        raise StorageUserError(f"permission denied writing or reading {what}") from exc
    except OSError as exc:
        raise StorageError(f"local storage failed for {what}: {exc}") from exc


class LocalStore(StoreBase):
    """A directory with object-store semantics (atomic writes via temp file + ``os.replace``)."""

    capabilities = frozenset({Capability.CONDITIONAL_WRITE})

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def url(self, key: str) -> str:
        return str(self._path(key))

    def _atomic_write(self, key: str, write: Callable[[IO[bytes]], object]) -> None:
        dest = self._path(key)
        with _local_errors(str(dest)):
            _write_atomically(dest, write, fsync=True)

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | Path) -> None:
        with open(path, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, _COPY_BUFFER))

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        with _local_errors(str(path)):
            return path.read_bytes()

    def get_range(self, key: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes from offset ``start`` (fewer at the end of the object)."""
        path = self._path(key)
        with _local_errors(str(path)), open(path, "rb") as f:
            f.seek(start)
            return f.read(length)

    def get_file(self, key: str, path: str | Path) -> None:
        src, dest = self._path(key), Path(path)
        with _local_errors(str(src)), open(src, "rb") as f:
            _write_atomically(dest, lambda out: shutil.copyfileobj(f, out, _COPY_BUFFER))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        rel_dir = prefix.rpartition("/")[0]
        start = self.root.joinpath(*rel_dir.split("/")) if rel_dir else self.root
        return (o for o in self._walk(start, rel_dir, prefix) if o.key.startswith(prefix))

    def _walk(self, directory: Path, rel: str, prefix: str) -> Iterator[ObjectInfo]:
        """Depth-first in key order: a directory sorts as ``name + "/"``."""
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        dirs = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
        for entry in sorted(entries, key=lambda e: e.name + "/" if e.name in dirs else e.name):
            key = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name in dirs:
                sub = key + "/"
                if sub.startswith(prefix) or prefix.startswith(sub):
                    yield from self._walk(Path(entry.path), key, prefix)
            elif entry.is_file() and not entry.name.startswith(_TMP_PREFIX):
                with contextlib.suppress(FileNotFoundError):  # deleted while listing
                    stat = entry.stat()
                    yield ObjectInfo(key, stat.st_size, str(stat.st_mtime_ns))

    def delete(self, keys: Iterable[str]) -> None:
        paths = [self._path(k) for k in keys]
        for path in paths:
            with _local_errors(str(path)):
                path.unlink(missing_ok=True)
                self._remove_empty_parents(path.parent)

    # -- conditional writes (the run lease): create-if-absent is a hard link of a complete
    # temp file (O_EXCL semantics); compare-and-swap runs under an flock on the key's folder.

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist; False if it does."""
        dest = self._path(key)
        with _local_errors(str(dest)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = temp_file_beside(dest)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, dest)
                except FileExistsError:
                    return False
                return True
            finally:
                os.unlink(tmp)

    def read_tagged(self, key: str) -> tuple[bytes, str]:
        """The object and a tag that changes whenever it is rewritten."""
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def replace_if(self, key: str, data: bytes, tag: str) -> bool:
        """Overwrite ``key`` only if it still carries ``tag``."""
        dest = self._path(key)
        with self._key_lock(dest):
            if not self._has_tag(key, tag):
                return False
            with _local_errors(str(dest)):
                _write_atomically(dest, lambda f: f.write(data), fsync=True)
            return True

    def delete_if(self, key: str, tag: str) -> bool:
        """Delete ``key`` only if it still carries ``tag``."""
        dest = self._path(key)
        with self._key_lock(dest):
            if not self._has_tag(key, tag):
                return False
            self.delete([key])
            return True

    def _has_tag(self, key: str, tag: str) -> bool:
        try:
            return self.read_tagged(key)[1] == tag
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def _key_lock(self, dest: Path) -> Iterator[None]:
        """An flock on the key's folder itself: no lock file is left among the run's files."""
        with _local_errors(str(dest)):
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _remove_empty_parents(self, directory: Path) -> None:
        while directory != self.root and self.root in directory.parents:
            try:
                directory.rmdir()
            except OSError:  # not empty (or gone): stop here
                return
            directory = directory.parent


def _write_atomically(
    dest: Path, write: Callable[[IO[bytes]], object], fsync: bool = False
) -> None:
    """Write a local file through a temp file in its folder + ``os.replace``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file_beside(dest)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
