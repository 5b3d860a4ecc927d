"""Frames serialized around their data parse to the messages protobuf itself would build,
and reassemble into the tensor they came from."""

from __future__ import annotations

import pytest
import torch
from google.protobuf.message import DecodeError

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients._generated.deltavault.store.v1 import store_pb2
from clients.encoding import FrameAssembler, serialized_frames, tensor_frames
from clients.wire import parse_with_bytes, serialize_with_bytes
from store_svc.digest import Digest

BASE = compressor_pb2.TENSOR_ROLE_BASE


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 1 << 14, (1 << 21) + 3])
def test_bytes_field_appended_by_hand_parses_like_protobuf(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    head = store_pb2.PutChunksRequest(digest=Digest.of(b"x").to_proto(), total_size=size, offset=7)
    expected = store_pb2.PutChunksRequest()
    expected.CopyFrom(head)
    expected.data = data
    parsed = store_pb2.PutChunksRequest.FromString(
        serialize_with_bytes(head, "data", memoryview(data))
    )
    assert parsed == expected


def test_a_frame_inside_its_request_parses_like_protobuf() -> None:
    tensor = torch.randn(70, 33).half()
    by_hand = list(
        serialized_frames(compressor_pb2.ReconstructRequest, "base", ("w", BASE, tensor), 1000)
    )
    by_protobuf = [
        compressor_pb2.ReconstructRequest(base=frame)
        for frame in tensor_frames("w", BASE, tensor, 1000)
    ]
    assert [compressor_pb2.ReconstructRequest.FromString(m) for m in by_hand] == by_protobuf
    assert len(by_hand) == -(-tensor.numel() * 2 // 1000)


@pytest.mark.parametrize(
    "tensor",
    [torch.randn(5, 7), torch.zeros(0, 3).half(), torch.tensor(True), torch.arange(10)[::3]],
    ids=["fp32", "empty", "scalar-bool", "strided"],
)
def test_serialized_frames_reassemble_bit_for_bit(tensor: torch.Tensor) -> None:
    assembler = FrameAssembler(max_tensor_bytes=1 << 20)
    rebuilt = None
    for message in serialized_frames(
        compressor_pb2.CompressRequest, "frame", ("t", BASE, tensor), 8
    ):
        request, data = parse_with_bytes(message, compressor_pb2.CompressRequest, "frame", "data")
        rebuilt = assembler.add(request.frame, data)
    assert rebuilt is not None
    assert rebuilt.dtype == tensor.dtype and rebuilt.shape == tensor.shape
    assert torch.equal(rebuilt, tensor)
    assert assembler.pending_bytes == 0


def test_a_set_bytes_field_is_refused() -> None:
    with pytest.raises(ValueError, match="must be unset"):
        serialize_with_bytes(store_pb2.PutChunksRequest(data=b"x"), "data", b"y")


def _as_protobuf_parses(serialized: bytes) -> tuple[compressor_pb2.CompressRequest, bytes]:
    request = compressor_pb2.CompressRequest.FromString(serialized)
    data = request.frame.data
    if request.HasField("frame"):
        request.frame.ClearField("data")
    return request, data


def _frame_request(data: bytes) -> compressor_pb2.CompressRequest:
    frame = compressor_pb2.TensorFrame(
        name="layers.0.weight", role=BASE, shape=[3, 5], dtype="float16", offset=9
    )
    frame.data = data
    return compressor_pb2.CompressRequest(frame=frame)


def _with_unknown_field_inside(data: bytes) -> bytes:
    """A compress frame request whose frame holds an unknown field 15 after its data."""
    inner = _frame_request(data).frame.SerializeToString() + bytes([15 << 3 | 2, 3]) + b"abc"
    assert len(inner) < 128
    return bytes([2 << 3 | 2, len(inner)]) + inner


@pytest.mark.parametrize(
    "serialized",
    [
        _frame_request(bytes(range(200)) * 5).SerializeToString(),
        serialize_with_bytes(
            _frame_request(b"").frame,
            "data",
            b"\x01" * 3000,
            wrapper=compressor_pb2.CompressRequest,
            wrapper_field="frame",
        ),
        _frame_request(b"").SerializeToString(),
        compressor_pb2.CompressRequest(end=compressor_pb2.End()).SerializeToString(),
        compressor_pb2.CompressRequest(
            header=compressor_pb2.CompressHeader(method="adamix", ratio=16)
        ).SerializeToString(),
        # the frame field twice (protobuf merges the two), then a header after a frame
        _frame_request(b"first").SerializeToString()
        + _frame_request(b"second").SerializeToString(),
        _frame_request(b"data").SerializeToString()
        + compressor_pb2.CompressRequest(end=compressor_pb2.End()).SerializeToString(),
        # unknown fields before the frame and inside it
        bytes([15 << 3 | 2, 3]) + b"abc" + _frame_request(b"xyz").SerializeToString(),
        _with_unknown_field_inside(b"xyz"),
        b"",
    ],
    ids=[
        "dense",
        "by-hand",
        "empty-data",
        "end",
        "header",
        "twice",
        "then-end",
        "unknown-before",
        "unknown-inside",
        "none",
    ],
)
def test_parse_with_bytes_gives_what_protobuf_gives(serialized: bytes) -> None:
    parsed = parse_with_bytes(serialized, compressor_pb2.CompressRequest, "frame", "data")
    expected, data = _as_protobuf_parses(serialized)
    assert parsed.message == expected
    assert parsed.data.tobytes() == data
    assert parsed.data.readonly


def test_parse_with_bytes_views_the_message_instead_of_copying() -> None:
    tensor = torch.randn(64, 64).half()
    (serialized,) = serialized_frames(
        compressor_pb2.CompressRequest, "frame", ("w", BASE, tensor), 1 << 20
    )
    parsed = parse_with_bytes(serialized, compressor_pb2.CompressRequest, "frame", "data")
    assert parsed.data.obj is serialized
    assert parsed.message.frame.total_bytes == tensor.numel() * 2 and not parsed.message.frame.data


@pytest.mark.parametrize("cut", [1, 5, 40])
def test_parse_with_bytes_refuses_a_truncated_message(cut: int) -> None:
    serialized = _frame_request(bytes(100)).SerializeToString()
    with pytest.raises(DecodeError):
        parse_with_bytes(serialized[:-cut], compressor_pb2.CompressRequest, "frame", "data")
