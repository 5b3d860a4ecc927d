"""The S3 backend: MinIO in production, any S3 API, through the ``minio`` SDK.

Create-if-absent is a conditional PutObject with ``If-None-Match: *``: of two racing
writers the server accepts one and answers 412 PreconditionFailed to the other. minio
7.2.20's public ``put_object`` takes no request headers: what it is given as ``metadata``
goes through ``normalize_headers``, which sends every name that is not ``x-amz-*`` or one
of five content headers as ``X-Amz-Meta-<name>`` user metadata, so ``If-None-Match`` would
be stored, not obeyed. The write therefore uses the SDK's private single-request
``_put_object(bucket, name, data, headers)`` (objects here are at most a few tens of MiB,
well within one PUT); re-check it when upgrading minio.

Write-once also shapes the HTTP retries: a request is retried only where it provably never
reached the server (connect errors) or is a read (GET, HEAD). Re-sending a conditional PUT
whose first attempt the server applied would answer 412, and this call would report
"already existed" for an object it created. Other failures surface as
``BackendUnavailable`` for the caller to retry knowingly.

Server-side encryption (``sse``): SSE-S3 (``SseS3``) adds its header to writes only; the
server decrypts reads by itself. SSE-C (``SseCustomerKey``) sends the key with every
write, read and stat, and the server keeps only a hash of it: an object is unreadable, also
through the S3 API, without the key. minio 7.2.20 does not itself refuse SSE-C over plain
HTTP (its ``Sse.tls_required`` is never consulted), but MinIO and AWS do, and the key
would cross the network in the clear: ``StoreConfig`` requires ``secure`` with it.
Listing needs no key, so keys, sizes and times stay visible to anyone who may list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError
from minio.sse import Sse, SseCustomerKey

from store_svc.backends.base import (
    BackendError,
    BackendUnavailable,
    ObjectInfo,
    ObjectNotFound,
    check_key,
)

T = TypeVar("T")

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchObject"})
_RACE_LOST_CODES = frozenset({"PreconditionFailed"})
# Transient whatever their status; AWS answers 409 ConditionalRequestConflict to a
# conditional write racing another on the same key, and 400 RequestTimeout to a slow client.
_TRANSIENT_CODES = frozenset(
    {"ConditionalRequestConflict", "RequestTimeout", "SlowDown", "ServiceUnavailable"}
)
_EXISTING_BUCKET_CODES = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
_CONNECT_TIMEOUT = 5.0
_READ_TIMEOUT = 60.0
_CONNECT_RETRIES = 1
_POOL_SIZE = 64


def _http_client(secure: bool, ca_file: Path | None = None) -> urllib3.PoolManager:
    """Bounded timeouts and few retries: a dead endpoint fails within ~10 s, a refused
    connection at once. ``ca_file``: trust only the CAs it holds (else the system's)."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=_CONNECT_TIMEOUT, read=_READ_TIMEOUT),
        retries=urllib3.Retry(
            total=_CONNECT_RETRIES + 1,
            connect=_CONNECT_RETRIES,
            read=1,
            status=0,
            other=0,
            allowed_methods=frozenset({"GET", "HEAD"}),  # read retries only
            respect_retry_after_header=False,
            backoff_factor=0.2,
        ),
        maxsize=_POOL_SIZE,
        cert_reqs="CERT_REQUIRED" if secure else "CERT_NONE",
        ca_certs=str(ca_file) if secure and ca_file is not None else None,
    )


class S3Backend:
    """Objects in one bucket, under ``prefix`` (so several stores can share a bucket),
    encrypted by the server as ``sse`` says (None: as the bucket's default does)."""

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
        sse: Sse | None = None,
        ca_file: Path | None = None,
    ) -> None:
        if prefix:
            check_key(prefix.rstrip("/"))
            prefix = prefix.rstrip("/") + "/"
        self._bucket = bucket
        self._prefix = prefix
        self._put_headers = {"If-None-Match": "*", **(sse.headers() if sse else {})}
        # Reads and stats carry only a customer key: AWS refuses SSE-S3 headers on them.
        self._ssec = sse if isinstance(sse, SseCustomerKey) else None
        self._http = _http_client(secure, ca_file)
        self._client = Minio(
            endpoint,
            access_key,
            secret_key,
            secure=secure,
            region=region,
            http_client=self._http,
        )
        if create_bucket:
            self._ensure_bucket()

    def put_if_absent(self, key: str, data: bytes) -> bool:
        name = self._name(key)

        def put() -> bool:
            try:
                self._client._put_object(  # private: see the module docstring
                    self._bucket, name, data, headers=dict(self._put_headers)
                )
            except S3Error as exc:
                if exc.code in _RACE_LOST_CODES:
                    return False
                raise
            return True

        return self._call(put, key)

    def get(self, key: str) -> bytes:
        name = self._name(key)

        def read() -> bytes:
            response = self._client.get_object(self._bucket, name, ssec=self._ssec)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return self._read(read, key)

    def stat(self, key: str) -> ObjectInfo:
        name = self._name(key)
        result = self._read(
            lambda: self._client.stat_object(self._bucket, name, ssec=self._ssec), key
        )
        modified = result.last_modified.timestamp() if result.last_modified else 0.0
        return ObjectInfo(key, int(result.size or 0), modified)

    def exists(self, key: str) -> bool:
        try:
            self.stat(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        objects = self._client.list_objects(
            self._bucket, prefix=self._prefix + prefix, recursive=True
        )
        while True:
            item = self._call(lambda: next(objects, None), prefix)
            if item is None:
                return
            key = str(item.object_name)[len(self._prefix) :]
            # Skip folder markers some servers keep, and what a server that normalises the
            # prefix (SeaweedFS lists ``a/`` for ``a//``) returns beyond it.
            if item.is_dir or not key.startswith(prefix):
                continue
            modified = item.last_modified.timestamp() if item.last_modified else 0.0
            yield ObjectInfo(key, int(item.size or 0), modified)

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._call(lambda: self._client.remove_object(self._bucket, name), key)

    def close(self) -> None:
        self._http.clear()

    def _ensure_bucket(self) -> None:
        def ensure() -> None:
            if self._client.bucket_exists(self._bucket):
                return
            try:
                self._client.make_bucket(self._bucket)
            except S3Error as exc:
                if exc.code not in _EXISTING_BUCKET_CODES:
                    raise

        self._call(ensure, f"bucket {self._bucket}")

    def _read(self, fn: Callable[[], T], key: str) -> T:
        """``_call`` for a read or stat, naming the likely cause when SSE-C is on."""
        try:
            return self._call(fn, key)
        except (ObjectNotFound, BackendUnavailable):
            raise
        except BackendError as exc:
            if self._ssec is None:
                raise
            raise BackendError(
                f"{exc} (with SSE-C on, an object written under another key, or without "
                "SSE-C, cannot be read)"
            ) from exc

    def _name(self, key: str) -> str:
        return self._prefix + check_key(key)

    @staticmethod
    def _call(fn: Callable[[], T], what: str) -> T:
        """Run one SDK call, translating its errors into the backend contract."""
        try:
            return fn()
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(what) from None
            error = f"S3 refused {what!r}: {exc.code}: {exc.message}"
            if exc.code in _TRANSIENT_CODES or exc.response.status >= 500:
                raise BackendUnavailable(error) from exc
            raise BackendError(error) from exc
        except (ServerError, InvalidResponseError) as exc:
            # Answers without an S3 error body (HEAD, a proxy's page). minio 7.2.20 keeps
            # InvalidResponseError's status only in its private ``_code``.
            status = exc.status_code if isinstance(exc, ServerError) else exc._code
            if status >= 500:
                raise BackendUnavailable(f"S3 server error on {what!r}: {exc}") from exc
            raise BackendError(f"S3 failure on {what!r}: {exc}") from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise BackendUnavailable(f"S3 endpoint unreachable for {what!r}: {exc}") from exc
        except MinioException as exc:
            raise BackendError(f"S3 failure on {what!r}: {exc}") from exc
