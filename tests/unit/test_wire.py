"""Frames serialized around their data parse to the messages protobuf itself would build,
and reassemble into the tensor they came from."""

from __future__ import annotations

import pytest
import torch

from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients._generated.deltavault.store.v1 import store_pb2
from clients.encoding import FrameAssembler, serialized_frames, tensor_frames
from clients.wire import serialize_with_bytes
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
        rebuilt = assembler.add(compressor_pb2.CompressRequest.FromString(message).frame)
    assert rebuilt is not None
    assert rebuilt.dtype == tensor.dtype and rebuilt.shape == tensor.shape
    assert torch.equal(rebuilt, tensor)
    assert assembler.pending_bytes == 0


def test_a_set_bytes_field_is_refused() -> None:
    with pytest.raises(ValueError, match="must be unset"):
        serialize_with_bytes(store_pb2.PutChunksRequest(data=b"x"), "data", b"y")
