"""gRPC channels to deltavault services: message limits and TLS in one place."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc

from clients.tls import ClientTls

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 8 * MiB
"""Must exceed the server's frame limit (2 MiB by default) plus message overhead."""


def open_channel(
    target: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: ClientTls | None = None,
) -> grpc.Channel:
    """A channel to ``host:port`` with explicit message limits: over TLS when ``tls`` is
    given or ``DELTAVAULT_TLS_*`` is set (``clients.tls``), else plaintext.

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
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options + tls.channel_options)


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
