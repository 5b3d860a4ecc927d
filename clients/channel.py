"""gRPC channels to deltavault services: message limits in one place."""

from __future__ import annotations

from types import TracebackType
from typing import Self

import grpc

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 8 * MiB
"""Must exceed the server's frame limit (2 MiB by default) plus message overhead."""


def open_channel(
    target: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.Channel:
    """An insecure channel to ``host:port`` with explicit message limits.

    Retries are done by the clients themselves (they know which calls are idempotent and
    re-send only what a stream had not finished), so the channel's own retry is off.
    """
    return grpc.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.enable_retries", 0),
        ],
    )


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
