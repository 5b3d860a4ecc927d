"""Client-side exceptions, chosen from a closed table of gRPC status codes.

Never built from class names a server sends: the status code picks the class, and the
``google.rpc`` details (missing chunks, ref conflicts, corrupt chunks) fill its fields.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.digest import Digest


class DeltaVaultError(Exception):
    """A failed call. ``code`` is the gRPC status; the message is the server's."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retry_after: float | None = None
    """Seconds the server asked the caller to wait before retrying (``google.rpc.RetryInfo``,
    sent with a RESOURCE_EXHAUSTED from admission control); None: retrying will not help."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InvalidArgumentError(DeltaVaultError):
    """The request was malformed (bad digest, shape, ref name, range)."""


class NotFoundError(DeltaVaultError):
    """The ref, manifest or chunk does not exist."""


class PreconditionError(DeltaVaultError):
    """The store's state forbids the call, e.g. a manifest names absent chunks."""

    missing: list[Digest]


class ConflictError(DeltaVaultError):
    """A ref compare-and-swap lost: ``actual`` is where the ref points now (None: absent)."""

    expected: Digest | None
    actual: Digest | None


class DataLossError(DeltaVaultError):
    """Stored or uploaded bytes do not match their digest."""

    digest: Digest | None


class ResourceExhaustedError(DeltaVaultError):
    """A size or rate limit was exceeded."""


class PermissionDeniedError(DeltaVaultError):
    """The caller may not do this."""


class UnauthenticatedError(DeltaVaultError):
    """The caller presented no valid credentials."""


class UnavailableError(DeltaVaultError):
    """The service or its object store could not be reached; retrying may succeed."""


class InternalError(DeltaVaultError):
    """The server failed; its log has the details."""


_BY_CODE: dict[grpc.StatusCode, type[DeltaVaultError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: PreconditionError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def retry_delay(error: grpc.RpcError) -> float | None:
    """Whether a failed call is worth retrying, and after how long at least: 0 when the
    service was unreachable or too slow (the caller's backoff decides), the server's delay
    when it shed the call with ``google.rpc.RetryInfo``; None when retrying will not help."""
    call: grpc.Call = error  # type: ignore[assignment]
    if _BY_CODE.get(call.code()) is UnavailableError:
        return 0.0
    if call.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return _retry_after(rpc_status.from_call(call))
    return None


def _retry_after(status: status_pb2.Status | None) -> float | None:
    info = error_details_pb2.RetryInfo()
    for packed in status.details if status else ():
        if packed.Unpack(info):
            return float(info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
    return None


def from_rpc_error(error: grpc.RpcError) -> DeltaVaultError:
    """The client exception for a failed call, with its structured details parsed."""
    call: grpc.Call = error  # type: ignore[assignment]
    code = call.code()
    cls = _BY_CODE.get(code, InternalError)
    exc = cls(call.details() or code.name, code)
    status = rpc_status.from_call(call)
    _attach_details(exc, status)
    exc.retry_after = _retry_after(status)
    return exc


def _attach_details(exc: DeltaVaultError, status: status_pb2.Status | None) -> None:
    if isinstance(exc, PreconditionError):
        exc.missing = []
    if isinstance(exc, ConflictError):
        exc.expected = exc.actual = None
    if isinstance(exc, DataLossError):
        exc.digest = None
    for packed in status.details if status else ():
        missing, conflict, corrupt = (
            common_pb2.MissingChunksDetail(),
            common_pb2.RefConflictDetail(),
            common_pb2.CorruptChunkDetail(),
        )
        if isinstance(exc, PreconditionError) and packed.Unpack(missing):
            exc.missing = [Digest.from_proto(d) for d in missing.digests]
        elif isinstance(exc, ConflictError) and packed.Unpack(conflict):
            exc.expected = _maybe(conflict, "expected")
            exc.actual = _maybe(conflict, "actual")
        elif isinstance(exc, DataLossError) and packed.Unpack(corrupt):
            exc.digest = Digest.from_proto(corrupt.digest)


def _maybe(detail: common_pb2.RefConflictDetail, field: str) -> Digest | None:
    if not detail.HasField(field):  # type: ignore[arg-type]
        return None
    return Digest.from_proto(getattr(detail, field))
