"""Object storage over string URIs: a local directory or ``s3://bucket/prefix``.

Both stores have the same semantics: keys are relative POSIX paths under the store's root
URI, writes are all-or-nothing (readers see the old object or the new one, never a part),
``list`` is lazy and sorted by key, and "directories" exist only through the keys in them.
S3 errors are translated at this boundary (see ``kubetune.errors``): a missing key raises
``FileNotFoundError``, a refusal the user must fix raises ``StorageUserError`` naming the
bucket and endpoint, and failures that survived the retries raise ``StorageError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, runtime_checkable

from kubetune.errors import StorageError, StorageUserError

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.config import StorageConfig

MiB = 2**20
_TMP_PREFIX = ".kubetune-tmp-"
_COPY_BUFFER = 8 * MiB


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key relative to the store root, its size in bytes and a version
    tag (the S3 ETag, or the local file's mtime in ns) that changes when the object does."""

    key: str
    size: int
    etag: str = field(default="", compare=False)


@runtime_checkable
class ObjectStore(Protocol):
    """What every store offers; see docs/architecture.md."""

    uri: str

    def url(self, key: str) -> str: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_range(self, key: str, start: int, length: int) -> bytes: ...
    def put_file(self, key: str, path: str | Path) -> None: ...
    def get_file(self, key: str, path: str | Path) -> None: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, keys: Iterable[str]) -> None: ...


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise ``StorageUserError``."""
    if not isinstance(key, str) or not key:
        raise StorageUserError(f"invalid storage key {key!r}: empty")
    if key.startswith("/") or "\0" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageUserError(
            f"invalid storage key {key!r}",
            hint="keys are relative paths without '..', '.', empty segments or a leading '/'",
        )
    return key


def check_prefix(prefix: str) -> str:
    """Like ``check_key`` but allows ``""``, a trailing ``/`` and partial names."""
    body = prefix[:-1] if prefix.endswith("/") else prefix
    if prefix.startswith("/") or (body and not check_key(body)):
        raise StorageUserError(f"invalid storage prefix {prefix!r}")
    return prefix


def join_key(*parts: str) -> str:
    """Join key segments with ``/`` (empty parts skipped) and validate the result."""
    return check_key("/".join(p.strip("/") for p in parts if p.strip("/")))


def open_store(uri: str, storage: StorageConfig | Any | None = None, **options: Any) -> ObjectStore:
    """Open the store rooted at ``uri`` (a local path, ``file://path`` or ``s3://bucket/prefix``).

    For S3, endpoint / region / addressing style / TLS verification come from ``storage``
    (any object with the ``StorageConfig`` attributes) or the ``AWS_*`` environment;
    credentials only from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``. ``options`` are
    passed to ``S3Store`` (retries, timeouts, page size, multipart settings).
    """
    if uri.startswith("s3://"):
        from kubetune.storage.s3 import S3Store, s3_settings

        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise StorageUserError(f"no bucket in S3 URI {uri!r}", hint="use s3://bucket/prefix")
        return S3Store(bucket, prefix, **{**s3_settings(storage), **options})
    if "://" in uri and not uri.startswith("file://"):
        raise StorageUserError(f"unsupported storage URI {uri!r}", hint="use a path or s3://")
    if options:
        raise TypeError(f"local stores take no options: {sorted(options)}")
    return LocalStore(uri[len("file://") :] if uri.startswith("file://") else uri)


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


class LocalStore:
    """A directory with object-store semantics (atomic writes via temp file + ``os.replace``)."""

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
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
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
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
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
