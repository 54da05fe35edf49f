"""Storage URIs and the scheme registry: which backend opens ``s3://``, ``gs://``, ``az://``
and local paths, and the one place that parses a storage URI.

A backend registers its scheme with ``register_scheme(scheme, "module:function")``; the module
is imported only when a URI of that scheme is opened (the launcher stays light). The opener is
called as ``opener(location, storage, **options)`` with the parsed ``StorageURI``, the run's
``StorageConfig`` when its ``provider`` is that scheme's (else None: settings for one cloud
never leak into another) and backend options; it returns an ``ObjectStore``. Adding a backend
is one module plus one ``register_scheme`` line below.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kubetune.errors import StorageUserError

if TYPE_CHECKING:  # pragma: no cover
    from kubetune.storage.base import ObjectStore

_OPENERS: dict[str, str | Callable[..., ObjectStore]] = {}
_PROVIDERS: dict[str, str] = {}  # scheme -> StorageConfig.provider value


def register_scheme(
    scheme: str, opener: str | Callable[..., ObjectStore], provider: str | None = None
) -> None:
    """Open ``scheme://bucket/prefix`` URIs with ``opener`` (a callable or a lazy
    ``"module:function"``); ``provider`` is the ``storage.provider`` value whose settings the
    opener receives (default: the scheme itself)."""
    _OPENERS[scheme] = opener
    _PROVIDERS[scheme] = provider or scheme


def remote_schemes() -> tuple[str, ...]:
    """Every registered remote scheme, e.g. ``("s3", "gs", "az")``."""
    return tuple(_OPENERS)


def scheme_of_provider(provider: str) -> str:
    """The URI scheme of a ``storage.provider`` value (``gcs`` -> ``gs``)."""
    for scheme, name in _PROVIDERS.items():
        if name == provider:
            return scheme
    raise StorageUserError(f"unknown storage provider {provider!r}")


@dataclass(frozen=True)
class StorageURI:
    """A parsed storage location: ``scheme://bucket/path`` or a local path (``scheme == ""``)."""

    scheme: str
    bucket: str
    path: str
    """Key prefix inside the bucket (no leading or trailing ``/``), or the local path."""

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def root(self) -> str:
        """``scheme://bucket`` (or ``/`` for a local path)."""
        return f"{self.scheme}://{self.bucket}" if self.scheme else "/"

    def __str__(self) -> str:
        if self.is_local:
            return self.path
        return f"{self.root}/{self.path}" if self.path else self.root


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    return head.lower() if sep and head.isalnum() else ""


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names an object store (``s3://``, ``gs://``, ``az://``, ...)."""
    return _scheme(uri) in _OPENERS


def parse_uri(uri: str) -> StorageURI:
    """Parse ``uri``; ``StorageUserError`` for an unknown scheme or a missing bucket."""
    scheme = _scheme(uri)
    if scheme == "file":
        return StorageURI("", "", uri[len("file://") :])
    if not scheme:
        if "://" in uri:
            raise StorageUserError(f"unsupported storage URI {uri!r}", hint=_schemes_hint())
        return StorageURI("", "", uri)
    if scheme not in _OPENERS:
        raise StorageUserError(f"unsupported storage URI {uri!r}", hint=_schemes_hint())
    bucket, _, path = uri[len(scheme) + 3 :].partition("/")
    if not bucket:
        raise StorageUserError(f"no bucket in {uri!r}", hint=f"use {scheme}://bucket/prefix")
    return StorageURI(scheme, bucket, path.strip("/"))


def _schemes_hint() -> str:
    return "use a local path or " + ", ".join(f"{s}://bucket/prefix" for s in _OPENERS)


def split_uri(uri: str) -> tuple[str, str]:
    """(parent folder URI, last name) of a local path or a store URI."""
    if not is_remote(uri):
        absolute = os.path.abspath(parse_uri(uri).path)
        return os.path.dirname(absolute), os.path.basename(absolute)
    loc = parse_uri(uri)
    parent, _, name = loc.path.rpartition("/")
    return str(StorageURI(loc.scheme, loc.bucket, parent)), name


def join_uri(root: str, *keys: str) -> str:
    """``root`` with key segments appended (``/``-joined; empty segments skipped)."""
    tail = "/".join(k.strip("/") for k in keys if k.strip("/"))
    return f"{root.rstrip('/')}/{tail}" if tail else root


def open_store(uri: str, storage: Any | None = None, **options: Any) -> ObjectStore:
    """Open the store rooted at ``uri`` (a local path, ``file://path``, or a registered
    ``scheme://bucket/prefix``). ``storage`` is the run's ``StorageConfig`` (or any object
    with its attributes); it configures the backend of its ``provider`` only. ``options``
    go to the backend (retries, timeouts, multipart settings)."""
    loc = parse_uri(uri)
    if loc.is_local:
        if options:
            raise TypeError(f"local stores take no options: {sorted(options)}")
        from kubetune.storage.local import LocalStore

        return LocalStore(loc.path)
    opener = _OPENERS[loc.scheme]
    if isinstance(opener, str):
        module, _, name = opener.partition(":")
        opener = _OPENERS[loc.scheme] = getattr(importlib.import_module(module), name)
    provider = getattr(storage, "provider", "s3") if storage is not None else None
    settings = storage if provider == _PROVIDERS[loc.scheme] else None
    return opener(loc, settings, **options)


register_scheme("s3", "kubetune.storage.s3:open_s3")
register_scheme("gs", "kubetune.storage.gcs:open_gcs", provider="gcs")
register_scheme("az", "kubetune.storage.azure:open_azure", provider="azure")
