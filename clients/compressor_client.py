"""``CompressorClient``: the compressor's three streams from Python.

Tensors go out as frames, produced lazily from whatever iterable the caller passes (a
checkpoint read one tensor at a time), so the client holds one frame in memory; gRPC's flow
control makes a slow server slow the reader down. Errors arrive as ``clients.errors``
exceptions; streams are never retried (a half-sent Compress commits nothing, so the caller
can simply run it again).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Generic, TypeVar

import grpc
from google.protobuf.message import Message
from torch import Tensor

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.channel import Closing, open_channel
from clients.encoding import FrameAssembler, FrameError, RoleTensor, serialized_frames
from clients.errors import DataLossError, from_rpc_error
from clients.wire import HEAP_FRAME_BYTES, bytes_field_parser, method_path

T = TypeVar("T")

DEFAULT_FRAME_BYTES = HEAP_FRAME_BYTES
"""Frame size of the streams (see ``clients.wire``). Ingest ran at 961 MiB/s with 512 KiB
frames and 746 at 1000 KiB in one pair of runs (``python -m tests.bench.bench_compressor
--frame-kib K``, 2026-12-01; runs vary widely)."""
DEFAULT_STREAM_TIMEOUT = 24 * 3600.0
"""Deadline of one stream: compressing a large model on CPU takes hours."""

_METHOD_COMPRESS = method_path(compressor_pb2, "Compressor", "Compress")
_METHOD_PLAN = method_path(compressor_pb2, "Compressor", "Plan")
_METHOD_RECONSTRUCT = method_path(compressor_pb2, "Compressor", "Reconstruct")


class CompressorClient(Closing):
    def __init__(
        self,
        target: str,
        *,
        channel: grpc.Channel | None = None,
        frame_bytes: int = DEFAULT_FRAME_BYTES,
        timeout: float = DEFAULT_STREAM_TIMEOUT,
    ) -> None:
        self.target = target
        self._channel = channel or open_channel(target)
        # The stub's own callables would serialize each request; ours arrive serialized.
        # Reconstruct's frames come back with their bytes apart, not copied (clients.wire).
        self._compress = self._stream(_METHOD_COMPRESS, compressor_pb2.CompressResponse.FromString)
        self._plan = self._stream(_METHOD_PLAN, compressor_pb2.PlanResponse.FromString)
        self._reconstruct = self._stream(
            _METHOD_RECONSTRUCT,
            bytes_field_parser(compressor_pb2.ReconstructResponse, "frame", "data"),
        )
        self._frame_bytes = frame_bytes
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def _stream(self, method: str, deserialize: Callable[[bytes], Any]) -> Any:
        return self._channel.stream_stream(
            method, request_serializer=None, response_deserializer=deserialize
        )

    def compress(
        self, header: compressor_pb2.CompressHeader, tensors: Iterable[RoleTensor]
    ) -> Iterator[compressor_pb2.CompressResponse]:
        """One event per tensor as the server finishes it, then the result."""

        request = compressor_pb2.CompressRequest
        outgoing = _Outgoing(self._requests(request(header=header), request, "frame", tensors))
        return _raising(self._compress(iter(outgoing), timeout=self._timeout), outgoing)

    def plan(
        self, header: compressor_pb2.PlanHeader, tensors: Iterable[RoleTensor]
    ) -> Iterator[compressor_pb2.PlanResponse]:
        """Per lossy tensor, the estimates of every planned method and ratio."""

        request = compressor_pb2.PlanRequest
        outgoing = _Outgoing(self._requests(request(header=header), request, "frame", tensors))
        return _raising(self._plan(iter(outgoing), timeout=self._timeout), outgoing)

    def reconstruct(
        self,
        header: compressor_pb2.ReconstructHeader,
        base: Iterable[tuple[str, Tensor]] = (),
        *,
        max_tensor_bytes: int = 1 << 40,
    ) -> Iterator[tuple[str, Tensor]]:
        """(name, tensor) per tensor: deltas, or with ``header.add_base`` the rebuilt weights
        of the ``base`` tensors streamed in, or with ``header.base_ref`` (or
        ``base_manifest``) those of a registered base (``base`` is then not read)."""

        request = compressor_pb2.ReconstructRequest
        role = compressor_pb2.TENSOR_ROLE_BASE
        stored_base = bool(header.base_ref) or header.HasField("base_manifest")
        streamed = header.add_base and not stored_base
        tensors = ((name, role, t) for name, t in base) if streamed else ()
        frames = FrameAssembler(max_tensor_bytes)
        outgoing = _Outgoing(self._requests(request(header=header), request, "base", tensors))
        call = self._reconstruct(iter(outgoing), timeout=self._timeout)
        for response, data in _raising(call, outgoing):
            try:
                tensor = frames.add(response.frame, data)
            except FrameError as exc:
                raise DataLossError(str(exc), grpc.StatusCode.DATA_LOSS) from None
            if tensor is not None:
                yield response.frame.name, tensor

    def _requests(
        self,
        header: Message,
        request_type: type[Message],
        frame_field: str,
        tensors: Iterable[RoleTensor],
    ) -> Iterator[bytes]:
        """A stream's requests, serialized: the header, every tensor's frames, End."""
        yield header.SerializeToString()
        for tensor in tensors:
            yield from serialized_frames(request_type, frame_field, tensor, self._frame_bytes)
        yield request_type(end=compressor_pb2.End()).SerializeToString()


class _Outgoing(Generic[T]):
    """A request stream that gRPC reads on its own thread, made stoppable: once the call is
    over, the reader stops at the next message and the caller waits for it to let go (a
    process must not exit while that thread is inside a checkpoint read)."""

    def __init__(self, messages: Iterator[T]) -> None:
        self._messages = messages
        self._stop = threading.Event()
        self._started = threading.Event()
        self._finished = threading.Event()

    def __iter__(self) -> Iterator[T]:
        self._started.set()
        try:
            for message in self._messages:
                if self._stop.is_set():
                    return
                yield message
        finally:
            self._finished.set()

    def close(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._started.is_set():
            self._finished.wait(timeout)


def _raising(responses: Iterator[T], outgoing: _Outgoing[Any]) -> Iterator[T]:
    """Iterate a response stream, turning a failed call into a ``DeltaVaultError``. When
    iteration stops early or fails, the call is cancelled and the request reader stopped."""
    try:
        yield from responses
    except grpc.RpcError as error:
        raise from_rpc_error(error) from None
    finally:
        if isinstance(responses, grpc.Future):
            responses.cancel()
        outgoing.close()
