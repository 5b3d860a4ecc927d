"""gRPC channels to deltavault services: message limits, TLS and tokens in one place."""

from __future__ import annotations

import collections
import os
from contextvars import ContextVar
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import grpc

from clients.tls import ClientTls

TOKEN_ENV = "DELTAVAULT_TOKEN"  # noqa: S105  (variable names, not secrets)
TOKEN_FILE_ENV = "DELTAVAULT_TOKEN_FILE"  # noqa: S105
forwarded_authorization: ContextVar[str | None] = ContextVar(
    "forwarded_authorization", default=None
)
"""While a service handles a call: the caller's ``authorization`` header. Channels opened
with ``forward_caller=True`` send it on the caller's behalf instead of their own token, so
the next service applies the caller's role and tenant rather than the forwarding
service's (the compressor reading and writing the store for its caller)."""
MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 8 * MiB
"""Must exceed the server's frame limit (2 MiB by default) plus message overhead."""


def open_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: ClientTls | None = None,
    forward_caller: bool = False,
) -> grpc.Channel:
    """A channel to ``host:port`` with explicit message limits: over TLS when ``tls`` is
    given or ``DELTAVAULT_TLS_*`` is set (``clients.tls``), else plaintext; every call
    carrying the bearer token of ``DELTAVAULT_TOKEN`` or ``DELTAVAULT_TOKEN_FILE`` (or,
    with ``forward_caller``, the ``forwarded_authorization`` of the call being handled).

    Retries are done by the clients themselves (they know which calls are idempotent and
    re-send only what a stream had not finished), so the channel's own retry is off.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
    ]
    tls = tls or ClientTls.from_env()
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(
            target, tls.credentials(), options=options + tls.channel_options
        )
    token = bearer_token()
    if token is None and not forward_caller:
        return channel
    return grpc.intercept_channel(channel, BearerToken(token, forward_caller=forward_caller))


def bearer_token() -> str | None:
    """The token ``DELTAVAULT_TOKEN`` holds, or the file ``DELTAVAULT_TOKEN_FILE`` names
    does (what a mounted Secret gives), or None."""
    token = os.environ.get(TOKEN_ENV)
    path = os.environ.get(TOKEN_FILE_ENV)
    if not token and path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read {TOKEN_FILE_ENV}={path}: {exc.strerror}") from None
    return token or None


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ["method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"],
    ),
    grpc.ClientCallDetails,
):
    """A call's details with other metadata (gRPC's documented way to rebuild them)."""


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call's metadata, or the forwarded
    caller's header when ``forward_caller`` and a call is being handled for one."""

    def __init__(self, token: str | None, *, forward_caller: bool = False) -> None:
        self._own = None if token is None else f"Bearer {token}"
        self._forward = forward_caller

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        header = (forwarded_authorization.get() if self._forward else None) or self._own
        added = [] if header is None else [("authorization", header)]
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), *added],
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


class Closing:
    """``with`` support for anything with a ``close()``: the clients and the SDK."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
