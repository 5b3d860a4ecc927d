"""A backend wrapper that counts failed operations for the metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

from store_svc.backends.base import (
    Backend,
    BackendError,
    BackendUnavailable,
    ObjectInfo,
    ObjectNotFound,
)
from store_svc.metrics import StoreMetrics

T = TypeVar("T")


class InstrumentedBackend:
    """Same contract as the wrapped backend; failures (not NotFound) are counted."""

    def __init__(self, inner: Backend, metrics: StoreMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def _call(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except ObjectNotFound:
            raise
        except BackendError as exc:
            kind = "unavailable" if isinstance(exc, BackendUnavailable) else "permanent"
            self._metrics.backend_errors.labels(operation, kind).inc()
            raise

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._call("put", lambda: self._inner.put_if_absent(key, data))

    def get(self, key: str) -> bytes:
        return self._call("get", lambda: self._inner.get(key))

    def stat(self, key: str) -> ObjectInfo:
        return self._call("stat", lambda: self._inner.stat(key))

    def exists(self, key: str) -> bool:
        return self._call("exists", lambda: self._inner.exists(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        iterator = self._call("list", lambda: self._inner.list(prefix))
        while True:
            info = self._call("list", lambda: next(iterator, None))
            if info is None:
                return
            yield info

    def delete(self, key: str) -> None:
        self._call("delete", lambda: self._inner.delete(key))

    def close(self) -> None:
        self._inner.close()
