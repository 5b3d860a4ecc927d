"""Admission control for both services: bounds on the streams and bytes in flight.

A streaming RPC (chunk uploads and reads, compress and reconstruct streams) holds a
stream slot while it runs, and leases the request and reply bytes it holds in memory
(chunks being assembled or queued for writing, chunks prefetched for sending) from a
byte budget. Each bound is per client (its principal when authenticated, else its host)
and global. Past a bound the call gets RESOURCE_EXHAUSTED with a ``google.rpc.RetryInfo``
detail: the client's own retry backs off and tries again, so load beyond capacity is
shed instead of exhausting the server's memory or threads. A limit of 0 is no limit.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from store_svc.errors import StoreError

RETRY_DELAY_SECONDS = 1
"""Back-off the refusal suggests (RetryInfo)."""


@dataclass(frozen=True)
class Limits:
    max_streams: int = 0
    """Streaming calls in flight in all; 0: unlimited."""
    max_streams_per_client: int = 0
    """Streaming calls in flight per client; 0: unlimited."""
    max_bytes: int = 0
    """Bytes streams hold in memory in all; 0: unlimited."""
    max_bytes_per_client: int = 0
    """Bytes one client's streams hold in memory; 0: unlimited."""

    def __post_init__(self) -> None:
        if min(vars(self).values()) < 0:
            raise ValueError("admission limits must be 0 (unlimited) or positive")


UNLIMITED = Limits()


class Overloaded(StoreError):
    """Admission refused: too many streams or bytes in flight. Retry after a while."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self) -> Sequence[Message]:
        delay = duration_pb2.Duration(seconds=RETRY_DELAY_SECONDS)
        return (error_details_pb2.RetryInfo(retry_delay=delay),)


class _Gauge:
    """One resource counted per client and in all, under the admission lock."""

    def __init__(self, what: str, total: int, per_client: int) -> None:
        self._what, self._total, self._per_client = what, total, per_client
        self._held: Counter[str] = Counter()
        self._sum = 0

    def take(self, client: str, amount: int) -> None:
        if self._total and self._sum + amount > self._total:
            raise Overloaded(
                f"the server holds {self._sum} {self._what} in flight, its limit is "
                f"{self._total}; retry shortly"
            )
        if self._per_client and self._held[client] + amount > self._per_client:
            raise Overloaded(
                f"{client} holds {self._held[client]} {self._what} in flight, the limit per "
                f"client is {self._per_client}; retry shortly"
            )
        self._held[client] += amount
        self._sum += amount

    def give(self, client: str, amount: int) -> None:
        self._held[client] -= amount
        self._sum -= amount
        if not self._held[client]:
            del self._held[client]


class Admission:
    """Counts streams and leased bytes against :class:`Limits`; thread-safe."""

    def __init__(self, limits: Limits) -> None:
        self._lock = threading.Lock()
        self._streams = _Gauge("streams", limits.max_streams, limits.max_streams_per_client)
        self._bytes = _Gauge("bytes", limits.max_bytes, limits.max_bytes_per_client)

    @contextmanager
    def stream(self, client: str) -> Iterator[ByteLease]:
        """Hold a stream slot for ``client`` (Overloaded if none is free) and yield its
        byte lease; everything is given back when the block ends."""
        with self._lock:
            self._streams.take(client, 1)
        lease = ByteLease(self, client)
        try:
            yield lease
        finally:
            lease.release(lease.held)
            with self._lock:
                self._streams.give(client, 1)

    def _take_bytes(self, client: str, amount: int) -> None:
        with self._lock:
            self._bytes.take(client, amount)

    def _give_bytes(self, client: str, amount: int) -> None:
        with self._lock:
            self._bytes.give(client, amount)


class ByteLease:
    """The bytes one stream holds in memory, taken and given back as it runs."""

    def __init__(self, admission: Admission | None, client: str) -> None:
        self._admission, self._client = admission, client
        self.held = 0

    def acquire(self, amount: int) -> None:
        """Take ``amount`` more bytes; Overloaded (nothing taken) past a limit."""
        if self._admission is not None and amount:
            self._admission._take_bytes(self._client, amount)
        self.held += amount

    def release(self, amount: int) -> None:
        if self._admission is not None and amount:
            self._admission._give_bytes(self._client, amount)
        self.held -= amount


_current_lease: ContextVar[ByteLease | None] = ContextVar("current_lease", default=None)


def current_lease() -> ByteLease:
    """The byte lease of the streaming call being handled on this thread; an unlimited
    one outside admission control (unary calls, a servicer used directly)."""
    return _current_lease.get() or ByteLease(None, "")


@contextmanager
def leasing(lease: ByteLease) -> Iterator[None]:
    """Make ``lease`` the current one for the block."""
    token = _current_lease.set(lease)
    try:
        yield
    finally:
        _current_lease.reset(token)


def client_of(principal: str | None, peer: str) -> str:
    """Whom per-client limits count: the authenticated principal, else the peer's host
    (``ipv4:10.0.0.7:53211`` -> ``ipv4:10.0.0.7``), so one client's many connections
    share one budget."""
    if principal is not None:
        return principal
    host, _, port = peer.rpartition(":")
    return host if host and port.isdigit() else peer
