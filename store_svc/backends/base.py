"""The object-storage contract every backend honours.

Keys are ``/``-separated ASCII paths (``chunks/ab/<hex>``); values are immutable byte
strings. The store never overwrites an object: it writes with ``put_if_absent`` and
deletes only in garbage collection. That single write-once primitive is enough for refs
too (see ``store_svc/refs.py``), so a backend needs no compare-and-swap of its own.

Errors are classified so callers can decide to retry:
``ObjectNotFound`` (the key is absent), ``BackendUnavailable`` (transient: connection
refused, timeout, 5xx; retrying may succeed), ``BackendError`` (permanent: bad
credentials, missing bucket, invalid request).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

# Matched whole (fullmatch): "$" would also match before a final newline.
_KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")


class BackendError(Exception):
    """A permanent storage failure: retrying the same call will fail again."""


class BackendUnavailable(BackendError):
    """A transient storage failure: the backend could not be reached or answered 5xx."""


class ObjectNotFound(BackendError):
    """The key does not exist."""

    def __init__(self, key: str) -> None:
        super().__init__(f"object {key!r} not found")
        self.key = key


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    modified: float
    """Last write time, seconds since the epoch (the backend's clock)."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise ``ValueError``.

    A valid key is one or more ``/``-separated segments of ``[A-Za-z0-9._-]``, none of
    them ``.`` or ``..``: it can never escape a local root or address a bucket's parent.
    """
    if not _KEY_PATTERN.fullmatch(key) or any(part in {".", ".."} for part in key.split("/")):
        raise ValueError(f"invalid object key {key!r}")
    return key


class Backend(Protocol):
    """Write-once object storage. Every method is safe to call from many threads."""

    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Store ``data`` under ``key`` unless the key exists.

        Atomic: readers see the whole object or no object, never a partial one. Returns
        True if this call created the object, False if it already existed (its bytes are
        left untouched, whatever they are). Safe to retry after ``BackendUnavailable``.
        """
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes. Raises ``ObjectNotFound``."""
        ...

    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time. Raises ``ObjectNotFound``."""
        ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (which need not end at a ``/``),
        each once, in no particular order.

        No order is promised because S3 implementations disagree: AWS and MinIO list in
        byte order of the whole key, SeaweedFS folder by folder. Callers sort what they need.
        """
        ...

    def delete(self, key: str) -> None:
        """Remove the object. Idempotent: deleting an absent key succeeds."""
        ...

    def close(self) -> None:
        """Release connections. The backend is unusable afterwards."""
        ...
