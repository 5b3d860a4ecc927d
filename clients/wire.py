"""Protobuf messages that carry one large ``bytes`` field, serialized and parsed around
that field.

Streams carry tensors and chunks as frames. upb builds each serialized message, and each
``bytes`` value it parses, in a buffer as big as the frame, and reading the field copies
it again; above glibc's mmap threshold every such buffer is a fresh mapping, faulted in and
unmapped per frame. The compressor pins that threshold at 1 MiB, and there protobuf took
(``python -m tests.bench.bench_wire --server-malloc``, 2026-12-01; microseconds per frame,
serialize / receive, where receiving is parse, read the field, copy it into its tensor):
51 / 36 at 256 KiB, 956 / 63 at 512 KiB, 3375-4580 / 1076-1639 at 1 MiB, 15703-19109 /
7470-10790 at 4 MiB. Here the small fields go through protobuf and the bytes field is
appended by hand (protobuf parsers accept fields in any order; the result parses to the
same message), and received, it is handed out as a view of the message: 18 / 25 at
256 KiB, 32 / 41 at 512 KiB, 750-924 / 59-72 at 1 MiB, 2867-4136 / 239-276 at 4 MiB. So
the streams' frames are :data:`HEAP_FRAME_BYTES`. Without the flag, a fresh process's
dynamic threshold gives other figures.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Generic, NamedTuple, TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)
T = TypeVar("T")

HEAP_FRAME_BYTES = 512 * 1024
"""Data bytes per frame, sent and by default asked for: the largest power of two whose
messages stay below the compressor's 1 MiB mmap threshold, on malloc's heap."""

_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5


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


class WithBytes(NamedTuple, Generic[M]):
    """A parsed message and, apart, the value of its one large bytes field."""

    message: M
    """The message with that field unset."""
    data: memoryview
    """The field's bytes: a read-only view of the serialized message (empty if unset)."""


def parse_with_bytes(serialized: bytes, message_type: type[M], *path: str) -> WithBytes[M]:
    """Parse ``serialized`` as ``message_type``, taking the bytes field at ``path`` (message
    fields from the outside in, then the bytes field: ``"frame", "data"``) as a view instead
    of a copy. Other fields, unknown ones included, parse as protobuf would parse them; a
    message where a field on the path occurs more than once (protobuf merges or overrides
    those) is parsed by protobuf whole. DecodeError on malformed input."""
    view = memoryview(serialized).toreadonly()
    split = _split(view, _path_numbers(message_type, path))
    if split is None:
        return _parse_whole(serialized, message_type, path)
    rest, data = split
    message = message_type.FromString(serialized if rest is None else bytes(rest))
    if not _holds(message, path[:-1]):  # a later member of its oneof replaced the field
        data = view[:0]
    return WithBytes(message, data)


def _holds(message: Message, fields: tuple[str, ...]) -> bool:
    """Whether the message fields along ``fields`` are all set."""
    for name in fields:
        if not message.HasField(name):
            return False
        message = getattr(message, name)
    return True


def bytes_field_parser(message_type: type[M], *path: str) -> Callable[[bytes], WithBytes[M]]:
    """:func:`parse_with_bytes` for one message type and path: a gRPC deserializer."""
    return lambda serialized: parse_with_bytes(serialized, message_type, *path)


class Malformed(NamedTuple):
    """What a :func:`lenient` deserializer gives for bytes that do not parse. gRPC answers
    a deserializer's exception itself, with INTERNAL ("Exception deserializing request!"),
    before any handler runs; given this instead, the handler refuses the call with a
    status and a message of its own."""

    message_type: str
    """The full name of the message the bytes were to be."""
    error: str


def lenient(
    parse: Callable[[bytes], T], message_type: type[Message]
) -> Callable[[bytes], T | Malformed]:
    """``parse`` (a deserializer of ``message_type``: its ``FromString``, or a
    :func:`bytes_field_parser`), giving a :class:`Malformed` where it raises DecodeError."""

    def parse_or_report(serialized: bytes) -> T | Malformed:
        try:
            return parse(serialized)
        except DecodeError as exc:
            return Malformed(message_type.DESCRIPTOR.full_name, str(exc))

    return parse_or_report


def _parse_whole(serialized: bytes, message_type: type[M], path: tuple[str, ...]) -> WithBytes[M]:
    """:func:`parse_with_bytes` the plain way: protobuf parses all, the field is moved out."""
    message = message_type.FromString(serialized)
    if not _holds(message, path[:-1]):
        return WithBytes(message, memoryview(b""))
    holder: Message = message
    for name in path[:-1]:
        holder = getattr(holder, name)
    data = getattr(holder, path[-1])
    holder.ClearField(path[-1])
    return WithBytes(message, memoryview(data))


def _path_numbers(message_type: type[Message], path: tuple[str, ...]) -> tuple[int, ...]:
    descriptor, numbers = message_type.DESCRIPTOR, []
    for name in path:
        field = descriptor.fields_by_name[name]
        numbers.append(int(field.number))
        if field.message_type is not None:
            descriptor = field.message_type
    return tuple(numbers)


def _split(view: memoryview, path: tuple[int, ...]) -> tuple[bytearray | None, memoryview] | None:
    """(the message without the bytes field at ``path``, or None when it has no such field;
    that field's value), or None for what protobuf should parse itself: a field of the path
    that repeats, or a group."""
    rest, data, found = bytearray(), view[:0], False
    position = 0
    while position < len(view):
        key, value_start = _read_varint(view, position)
        number, wire_type = key >> 3, key & 7
        span = _value_span(view, value_start, wire_type)
        if span is None:
            return None
        body, end = span
        if number != path[0] or wire_type != _LENGTH_DELIMITED:
            rest += view[position:end]
        elif found:
            return None
        elif len(path) == 1:
            found, data = True, view[body:end]
        else:
            inner = _split(view[body:end], path[1:])
            if inner is None:
                return None
            inner_rest, data = inner
            kept = view[body:end] if inner_rest is None else inner_rest
            rest += _field_prefix(number, len(kept)) + kept
            found = True
        position = end
    return (rest if found else None), data


def _read_varint(view: memoryview, position: int) -> tuple[int, int]:
    """(the varint at ``position``, where it ends)."""
    value = shift = 0
    while True:
        if position >= len(view) or shift > 63:
            raise DecodeError("truncated or overlong varint")
        byte = view[position]
        value |= (byte & 0x7F) << shift
        position += 1
        if not byte & 0x80:
            return value, position
        shift += 7


def _value_span(view: memoryview, position: int, wire_type: int) -> tuple[int, int] | None:
    """(where the value proper starts, where it ends) for a field whose value starts at
    ``position``; None for a group."""
    if wire_type == _VARINT:
        end = _read_varint(view, position)[1]
        return position, end
    if wire_type == _LENGTH_DELIMITED:
        length, position = _read_varint(view, position)
        end = position + length
    elif wire_type in (_FIXED64, _FIXED32):
        end = position + (8 if wire_type == _FIXED64 else 4)
    else:
        return None
    if end > len(view):
        raise DecodeError("a field runs past the end of the message")
    return position, end


def method_path(pb2: ModuleType, service: str, method: str) -> str:
    """The gRPC path ``/package.Service/Method`` of a method in a generated ``_pb2`` module,
    for callables opened on a channel directly (requests already serialized)."""
    return f"/{pb2.DESCRIPTOR.services_by_name[service].full_name}/{method}"
