"""The S3 backend: MinIO in production, any S3 API, through the ``minio`` SDK.

Create-if-absent is a conditional PutObject with ``If-None-Match: *``: of two racing
writers the server accepts one and answers 412 PreconditionFailed to the other. minio
7.2's public ``put_object`` turns unknown headers into user metadata, so the write uses
the SDK's single-request ``_put_object`` with the header set (objects here are at most a
few tens of MiB, well within one PUT).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from store_svc.backends.base import (
    BackendError,
    BackendUnavailable,
    ObjectInfo,
    ObjectNotFound,
    check_key,
)

T = TypeVar("T")

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchObject"}
_RACE_LOST_CODES = {"PreconditionFailed"}
# AWS answers 409 to a conditional write racing another on the same key: retryable.
_RACE_PENDING_CODES = {"ConditionalRequestConflict"}
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 60.0
_POOL_SIZE = 64


def _http_client(secure: bool) -> urllib3.PoolManager:
    """Bounded timeouts and few retries: a dead endpoint fails within seconds."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(502, 503, 504)),
        maxsize=_POOL_SIZE,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
    )


class S3Backend:
    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str | None = None,
        create_bucket: bool = True,
        prefix: str = "",
    ) -> None:
        if prefix:
            check_key(prefix.rstrip("/"))
            prefix = prefix.rstrip("/") + "/"
        self._bucket = bucket
        self._prefix = prefix
        self._client = Minio(
            endpoint,
            access_key,
            secret_key,
            secure=secure,
            region=region,
            http_client=_http_client(secure),
        )
        if create_bucket:
            self._ensure_bucket()

    def put_if_absent(self, key: str, data: bytes) -> bool:
        name = self._name(key)

        def put() -> bool:
            try:
                self._client._put_object(  # private: see the module docstring
                    self._bucket, name, data, headers={"If-None-Match": "*"}
                )
            except S3Error as exc:
                if exc.code in _RACE_LOST_CODES:
                    return False
                if exc.code in _RACE_PENDING_CODES:
                    raise BackendUnavailable(f"concurrent write to {key!r}; retry") from exc
                raise
            return True

        return self._call(put, key)

    def get(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(self._bucket, self._name(key))
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._call(read, key)

    def stat(self, key: str) -> ObjectInfo:
        result = self._call(lambda: self._client.stat_object(self._bucket, self._name(key)), key)
        modified = result.last_modified.timestamp() if result.last_modified else 0.0
        return ObjectInfo(key, int(result.size or 0), modified)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        objects = self._call(
            lambda: self._client.list_objects(
                self._bucket, prefix=self._prefix + prefix, recursive=True
            ),
            prefix,
        )
        while True:
            item = self._call(lambda: next(objects, None), prefix)
            if item is None:
                return
            modified = item.last_modified.timestamp() if item.last_modified else 0.0
            key = str(item.object_name)[len(self._prefix) :]
            yield ObjectInfo(key, int(item.size or 0), modified)

    def delete(self, key: str) -> None:
        self._call(lambda: self._client.remove_object(self._bucket, self._name(key)), key)

    def close(self) -> None:
        http = self._client._http  # private: the SDK exposes no close
        if http is not None:
            http.clear()

    def _ensure_bucket(self) -> None:
        def ensure() -> None:
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket)
            except S3Error as exc:
                if exc.code not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

        self._call(ensure, f"bucket {self._bucket}")

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    def _call(self, fn: Callable[[], T], what: str) -> T:
        """Run one SDK call, translating its errors into the backend contract."""
        try:
            return fn()
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(what) from None
            raise BackendError(f"S3 refused {what!r}: {exc.code}: {exc.message}") from exc
        except ServerError as exc:
            raise BackendUnavailable(f"S3 server error on {what!r}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendUnavailable(f"S3 endpoint unreachable for {what!r}: {exc}") from exc
        except (InvalidResponseError, MinioException) as exc:
            raise BackendError(f"S3 failure on {what!r}: {exc}") from exc
