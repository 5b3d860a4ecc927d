"""Domain errors of the compressor, each carrying the gRPC status it maps to.

The pipeline raises these with a message that names the tensor; the shared interceptor
(:mod:`store_svc.interceptors`) turns them into statuses. Errors the store client raises
(``clients.errors.DeltaVaultError``) keep the store's status code: an unreachable store
stays UNAVAILABLE, a lost ref compare-and-swap stays ABORTED.
"""

from __future__ import annotations

import grpc

from store_svc.errors import StoreError


class CompressorError(StoreError):
    """Base class: a failure with a status code and a message a person can act on."""


class InvalidInput(CompressorError):
    """Bad header, bad frames, mismatched or non-finite tensors, a missing tensor."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class TooMuchInFlight(CompressorError):
    """The stream holds more unfinished tensor bytes than the server allows."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class TensorTooLarge(CompressorError):
    """A stored tensor decodes to more bytes than the server holds for one tensor."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Undecodable(CompressorError):
    """A stored delta the store accepted but no compressor wrote: an unknown method or
    dtype, parts or params missing, sizes that disagree. Only another manifest helps."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SealedWithoutKey(CompressorError):
    """A sealed manifest asked for without the data key that opens it."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class MissingBase(CompressorError):
    """A reconstruction needs base tensors the client did not send."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RefNotFound(CompressorError):
    code = grpc.StatusCode.NOT_FOUND
