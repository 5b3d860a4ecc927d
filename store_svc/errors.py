"""Domain errors of the delta store, each carrying the gRPC status it maps to.

The servicer raises these; one interceptor turns them into statuses (with structured
``google.rpc`` details where a client can act on them). Anything else is INTERNAL.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf.message import Message

from clients._generated.deltavault.common.v1 import common_pb2
from store_svc.digest import Digest


class StoreError(Exception):
    """Base class: a failure with a status code and a message a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def details(self) -> Sequence[Message]:
        """Structured details for ``google.rpc.Status.details``."""
        return ()


class InvalidArgument(StoreError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class FrameTooLarge(StoreError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class QuotaExceeded(StoreError):
    """A tenant's upload would take it past its byte quota; nothing of it was written."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, tenant: str, held: int, size: int, quota: int) -> None:
        super().__init__(
            f"tenant {tenant!r} holds {held} of its {quota} quota bytes; a chunk of {size} "
            "bytes would exceed it (nothing was written): delete refs and have an admin "
            "collect garbage, or raise the quota"
        )


class NotFound(StoreError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(StoreError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(StoreError):
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(StoreError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(StoreError):
    code = grpc.StatusCode.UNAVAILABLE


class ChunkDigestMismatch(StoreError):
    """Uploaded bytes do not hash to the digest the client named."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, claimed: Digest, actual: Digest) -> None:
        super().__init__(
            f"chunk bytes hash to {actual}, not to the claimed {claimed}; nothing was written"
        )
        self.claimed = claimed


class CorruptObject(StoreError):
    """Stored bytes no longer match their name: never returned to a client."""

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, digest: Digest, reason: str) -> None:
        super().__init__(f"stored object {digest} is corrupt ({reason}); run Verify")
        self.digest, self.reason = digest, reason

    def details(self) -> Sequence[Message]:
        return (common_pb2.CorruptChunkDetail(digest=self.digest.to_proto(), reason=self.reason),)


class MissingChunks(FailedPrecondition):
    """Chunks a manifest or a read names are absent."""

    def __init__(self, digests: Sequence[Digest], *, context: str) -> None:
        shown = ", ".join(str(d) for d in digests[:3])
        more = f" and {len(digests) - 3} more" if len(digests) > 3 else ""
        super().__init__(f"{context}: {len(digests)} chunk(s) absent: {shown}{more}")
        self.digests = list(digests)

    def details(self) -> Sequence[Message]:
        return (common_pb2.MissingChunksDetail(digests=[d.to_proto() for d in self.digests]),)


class ChunkNotFound(MissingChunks):
    code = grpc.StatusCode.NOT_FOUND


class RefConflict(StoreError):
    """A compare-and-swap on a ref lost: the ref does not point where the caller expected."""

    code = grpc.StatusCode.ABORTED

    def __init__(self, ref: str, expected: Digest | None, actual: Digest | None) -> None:
        super().__init__(
            f"ref {ref!r} points at {actual or 'nothing'}, not at the expected "
            f"{expected or 'nothing'}; re-read it and retry"
        )
        self.ref, self.expected, self.actual = ref, expected, actual

    def details(self) -> Sequence[Message]:
        detail = common_pb2.RefConflictDetail(ref=self.ref)
        if self.expected is not None:
            detail.expected.CopyFrom(self.expected.to_proto())
        if self.actual is not None:
            detail.actual.CopyFrom(self.actual.to_proto())
        return (detail,)
