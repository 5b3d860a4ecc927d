"""Protobuf messages that carry one large ``bytes`` field, serialized around that field.

The streams send tensors and chunks as frames of a few hundred KiB. upb's serializer
builds each such message in a fresh arena block as big as the frame; glibc serves a block
that size with mmap, so every frame pays a map, page faults and an unmap: a 256 KiB frame
took 644.5 µs (388 MiB/s, below the gRPC stream itself). Here the small fields are
serialized by protobuf and the bytes field is appended by hand as a length-delimited field
(protobuf parsers accept fields in any order), in one join: 19.1 µs
(``python -m tests.bench.bench_wire``, 2026-12-01). The result parses to the same message
as ``SerializeToString`` would give.
"""

from __future__ import annotations

from types import ModuleType

from google.protobuf.message import Message

_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field_prefix(number: int, length: int) -> bytes:
    """Key and length of a length-delimited field ``number`` of ``length`` bytes."""
    return _varint(number << 3 | _LENGTH_DELIMITED) + _varint(length)


def _number(message_type: type[Message] | Message, field: str) -> int:
    return int(message_type.DESCRIPTOR.fields_by_name[field].number)


def serialize_with_bytes(
    message: Message,
    field: str,
    data: bytes | memoryview,
    *,
    wrapper: type[Message] | None = None,
    wrapper_field: str = "",
) -> bytes:
    """``message`` with ``data`` as its bytes field ``field`` (left unset in ``message``),
    serialized; with ``wrapper``, as the message field ``wrapper_field`` of a ``wrapper``
    message (a request's oneof frame)."""
    if getattr(message, field):
        raise ValueError(f"{field!r} must be unset in the message: it is appended here")
    view = memoryview(data).cast("B")
    head = message.SerializeToString()
    pieces: list[bytes | memoryview] = [head]
    size = len(head)
    if view.nbytes:
        prefix = _field_prefix(_number(message, field), view.nbytes)
        pieces += [prefix, view]
        size += len(prefix) + view.nbytes
    if wrapper is not None:
        pieces.insert(0, _field_prefix(_number(wrapper, wrapper_field), size))
    return b"".join(pieces)


def method_path(pb2: ModuleType, service: str, method: str) -> str:
    """The gRPC path ``/package.Service/Method`` of a method in a generated ``_pb2`` module,
    for callables opened on a channel directly (requests already serialized)."""
    return f"/{pb2.DESCRIPTOR.services_by_name[service].full_name}/{method}"
