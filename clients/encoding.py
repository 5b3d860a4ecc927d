"""Tensors on the wire and encoded tensors in the store: the conversions both services and
the SDK share.

- Wire: a tensor travels as :class:`TensorFrame` messages of at most ``frame_bytes`` raw
  little-endian bytes each (:func:`tensor_frames`, or :func:`serialized_frames` already in
  their request messages); :class:`FrameAssembler` puts a tensor back together, checking
  that every frame agrees on shape and dtype and that the bytes arrive in order and add up.
- Store: an :class:`~kernels.reference.EncodedTensor` becomes a ``TensorEntry`` whose parts
  name chunks (:func:`upload_encoded`); :func:`read_encoded` and :func:`decode_entry` turn an
  entry back into the encoding and the fp32 delta it stands for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from google.protobuf.message import Message
from torch import Tensor

from clients._generated.deltavault.common.v1 import common_pb2
from clients._generated.deltavault.compressor.v1 import compressor_pb2
from clients.store_client import StoreClient
from clients.wire import serialize_with_bytes
from kernels.reference import EncodedTensor, Part, PartDtype, decode, rebuild
from store_svc.digest import Algorithm

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
"""Element types a frame may carry, by their wire name."""

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64"})

RoleTensor = tuple[str, "compressor_pb2.TensorRole.ValueType", Tensor]
"""(tensor name, role, tensor) as the compressor's input."""

_NAME_OF = {dtype: name for name, dtype in WIRE_DTYPES.items()}


class FrameError(ValueError):
    """Frames that do not make a tensor: inconsistent, out of order, or incomplete."""


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; ValueError for one the wire does not carry."""
    try:
        return _NAME_OF[dtype]
    except KeyError:
        raise ValueError(f"{dtype} cannot be sent; supported: {sorted(WIRE_DTYPES)}") from None


def tensor_bytes(tensor: Tensor) -> memoryview:
    """The tensor's little-endian bytes, without a copy when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def frame_slices(
    name: str, role: compressor_pb2.TensorRole.ValueType, tensor: Tensor, frame_bytes: int
) -> Iterator[tuple[compressor_pb2.TensorFrame, memoryview]]:
    """``tensor`` as (frame without its data, the frame's data) pairs of at most
    ``frame_bytes`` data bytes each (one pair if the tensor is empty)."""
    data = tensor_bytes(tensor)
    shape, dtype = list(tensor.shape), dtype_name(tensor.dtype)
    for offset in range(0, max(len(data), 1), frame_bytes):
        frame = compressor_pb2.TensorFrame(
            name=name, role=role, shape=shape, dtype=dtype, offset=offset, total_bytes=len(data)
        )
        yield frame, data[offset : offset + frame_bytes]


def tensor_frames(
    name: str, role: compressor_pb2.TensorRole.ValueType, tensor: Tensor, frame_bytes: int
) -> Iterator[compressor_pb2.TensorFrame]:
    """``tensor`` as frames of at most ``frame_bytes`` data bytes (one frame if empty)."""
    for frame, data in frame_slices(name, role, tensor, frame_bytes):
        frame.data = bytes(data)
        yield frame


def serialized_frames(
    request_type: type[Message], field: str, tensor: RoleTensor, frame_bytes: int
) -> Iterator[bytes]:
    """The tensor's frames, each as a serialized ``request_type`` whose ``field`` holds it
    (see :mod:`clients.wire` for why not ``SerializeToString``)."""
    name, role, values = tensor
    for frame, data in frame_slices(name, role, values, frame_bytes):
        yield serialize_with_bytes(frame, "data", data, wrapper=request_type, wrapper_field=field)


@dataclass
class _Partial:
    shape: tuple[int, ...]
    dtype: str
    buffer: Tensor
    """The tensor's bytes as uint8, allocated uninitialised: every byte is written once."""
    received: int = 0
    _view: memoryview = field(init=False, repr=False)

    def __post_init__(self) -> None:
        array: Any = self.buffer.numpy()
        self._view = memoryview(array)

    @property
    def size(self) -> int:
        return len(self._view)

    def write(self, data: bytes | memoryview) -> None:
        end = self.received + len(data)
        self._view[self.received : end] = data
        self.received = end


@dataclass
class FrameAssembler:
    """Collects frames into whole tensors, keyed by (role, name).

    ``add`` returns the finished tensor when a frame completes one, else None. ``pending``
    bytes are those held for unfinished tensors: the caller bounds memory with it.
    """

    max_tensor_bytes: int
    _partial: dict[tuple[int, str], _Partial] = field(default_factory=dict)

    @property
    def pending_bytes(self) -> int:
        return sum(p.size for p in self._partial.values())

    def unfinished(self) -> list[tuple[int, str]]:
        """(role, name) of every tensor whose frames have not all arrived."""
        return list(self._partial)

    def add(self, frame: compressor_pb2.TensorFrame, data: bytes | memoryview) -> Tensor | None:
        """Add one frame whose bytes are ``data`` (``frame.data`` itself is not read: a
        received frame's bytes come apart from it, see ``clients.wire.parse_with_bytes``)."""
        key = (int(frame.role), frame.name)
        partial = self._partial.get(key) or self._start(frame)
        if tuple(frame.shape) != partial.shape or frame.dtype != partial.dtype:
            raise FrameError(
                f"tensor {frame.name!r}: a frame says {frame.dtype} {tuple(frame.shape)}, "
                f"earlier frames said {partial.dtype} {partial.shape}"
            )
        if frame.offset != partial.received:
            raise FrameError(
                f"tensor {frame.name!r}: frame at byte {frame.offset}, expected "
                f"{partial.received} (frames of a tensor must arrive in order)"
            )
        if partial.received + len(data) > partial.size:
            raise FrameError(
                f"tensor {frame.name!r}: frames carry more than its {partial.size} bytes"
            )
        partial.write(data)
        self._partial[key] = partial
        if partial.received < partial.size:
            return None
        del self._partial[key]
        return _to_tensor(partial)

    def _start(self, frame: compressor_pb2.TensorFrame) -> _Partial:
        if not frame.name:
            raise FrameError("a frame has no tensor name")
        if frame.dtype not in WIRE_DTYPES:
            raise FrameError(
                f"tensor {frame.name!r}: dtype {frame.dtype!r} is not one of {sorted(WIRE_DTYPES)}"
            )
        if any(d < 0 for d in frame.shape):
            raise FrameError(f"tensor {frame.name!r}: negative dimension in {list(frame.shape)}")
        size = math.prod(frame.shape) * WIRE_DTYPES[frame.dtype].itemsize
        if frame.total_bytes != size:
            raise FrameError(
                f"tensor {frame.name!r}: {frame.dtype} {list(frame.shape)} is {size} bytes, "
                f"the frame says {frame.total_bytes}"
            )
        if size > self.max_tensor_bytes:
            raise FrameError(
                f"tensor {frame.name!r} is {size} bytes, above this server's "
                f"{self.max_tensor_bytes}-byte limit per tensor"
            )
        return _Partial(tuple(frame.shape), frame.dtype, torch.empty(size, dtype=torch.uint8))


def _to_tensor(partial: _Partial) -> Tensor:
    return partial.buffer.view(WIRE_DTYPES[partial.dtype]).reshape(partial.shape)


# --- encoded tensors in the store --------------------------------------------------------


@dataclass(frozen=True)
class UploadedTensor:
    entry: common_pb2.TensorEntry
    bytes_stored: int
    """Raw bytes of every chunk the entry names."""
    new_chunk_bytes: int
    """Of which the store did not have before."""


def upload_encoded(
    store: StoreClient,
    name: str,
    encoded: EncodedTensor,
    *,
    kind: common_pb2.StorageKind.ValueType,
    algorithm: Algorithm,
) -> UploadedTensor:
    """Store each part's bytes as chunks (sending only the missing ones) and describe them."""
    entry = common_pb2.TensorEntry(
        name=name,
        kind=kind,
        method=encoded.method,
        method_version=encoded.version,
        shape=list(encoded.shape),
        dtype=encoded.dtype,
        params=encoded.params,
        nbits=encoded.nbits,
    )
    stored = new = 0
    for part in encoded.parts:
        chunks, stats = store.upload(part.data, algorithm)
        stored, new = stored + len(part.data), new + stats.bytes_sent
        entry.parts.add(
            name=part.name,
            dtype=part.dtype.value,
            shape=list(part.shape),
            nbits=part.nbits,
            byte_length=sum(chunk.size for chunk in chunks),
            chunks=chunks,
        )
    return UploadedTensor(entry, stored, new)


def zero_entry(name: str, shape: tuple[int, ...], dtype: str) -> common_pb2.TensorEntry:
    """An entry for a tensor whose delta is exactly zero: nothing stored, the base is kept."""
    return common_pb2.TensorEntry(
        name=name, kind=common_pb2.STORAGE_KIND_ZERO, method="zero", shape=list(shape), dtype=dtype
    )


def read_encoded(store: StoreClient, entry: common_pb2.TensorEntry) -> EncodedTensor:
    """The encoding an entry describes, its chunks fetched and verified."""
    parts = tuple(
        Part(p.name, PartDtype(p.dtype), tuple(p.shape), store.read(p.chunks)) for p in entry.parts
    )
    return EncodedTensor(
        entry.method,
        entry.method_version,
        tuple(entry.shape),
        entry.dtype,
        dict(entry.params),
        parts,
    )


def decode_entry(store: StoreClient, entry: common_pb2.TensorEntry) -> Tensor:
    """The fp32 delta ΔŴ an entry stands for (zeros for a ZERO entry)."""
    if entry.kind == common_pb2.STORAGE_KIND_ZERO:
        return torch.zeros(tuple(entry.shape))
    return decode(read_encoded(store, entry))


def rebuild_tensor(
    store: StoreClient,
    entry: common_pb2.TensorEntry | None,
    base: Tensor,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """The fine-tuned tensor from its base and its entry, at ``dtype`` (default: the
    fine-tuned dtype). Without an entry (a tensor the delta does not name) or with a zero
    delta, the base itself, cast only if ``dtype`` asks. ValueError on a shape mismatch."""
    if entry is not None and list(base.shape) != list(entry.shape):
        raise ValueError(
            f"tensor {entry.name!r}: base shape {list(base.shape)} != stored {list(entry.shape)}"
        )
    if entry is None or entry.kind == common_pb2.STORAGE_KIND_ZERO:
        return base if dtype is None or not base.is_floating_point() else base.to(dtype)
    return rebuild(base, read_encoded(store, entry), dtype or WIRE_DTYPES[entry.dtype])
