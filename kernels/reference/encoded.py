"""The encoded form of one compressed tensor, and its versioned byte serialization.

An :class:`EncodedTensor` maps one-to-one onto the ``TensorEntry``/``EncodedPart`` protobuf
messages: method name + integer version, the delta's shape and dtype, string ``params``
(everything needed to decode that is not a part: seeds, group sizes, PRNG name/version), and
an ordered tuple of :class:`Part`. A part's ``nbits`` is exactly ``numel x element width``, so
the encoded size in bits is exact: packed codes count ``b`` bits each, not a byte.

Serialized layout (``FORMAT_VERSION`` 1), all integers little-endian::

    b"DVET" | u16 format version | u32 header length | header (UTF-8 JSON, sorted keys)
            | part 0 bytes | part 1 bytes | ...

The header lists method, version, shape, dtype, params and, per part, name, dtype, shape,
nbits and byte length, so the bytes describe themselves.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kernels.reference.packing import pack, packed_nbytes, unpack
from kernels.reference.quant import QuantParams

CodePacker = Callable[[Tensor, int], Tensor]
"""(codes, bits) → packed uint8 stream."""

MAGIC = b"DVET"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHI")


class PartDtype(enum.StrEnum):
    """Element type of a part as stored."""

    UINT1 = "uint1"
    """1-bit codes, packed LSB-first into bytes (see ``kernels.reference.packing``)."""
    UINT2 = "uint2"
    """2-bit codes, packed."""
    UINT3 = "uint3"
    """3-bit codes, packed."""
    UINT4 = "uint4"
    """4-bit codes, packed."""
    UINT5 = "uint5"
    """5-bit codes, packed."""
    UINT6 = "uint6"
    """6-bit codes, packed."""
    UINT7 = "uint7"
    """7-bit codes, packed."""
    UINT8 = "uint8"
    """8-bit codes, one per byte."""
    FLOAT16 = "float16"
    """IEEE half, little-endian."""
    BFLOAT16 = "bfloat16"
    """bfloat16, little-endian."""
    FLOAT32 = "float32"
    """IEEE single, little-endian."""

    @property
    def bits(self) -> int:
        return _FLOAT_BITS.get(self, 0) or int(self.value.removeprefix("uint"))

    @property
    def is_code(self) -> bool:
        return self not in _FLOAT_BITS

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of a float part."""
        if self.is_code:
            raise ValueError(f"{self} holds codes, not floats")
        return _TO_TORCH[self]

    @classmethod
    def for_code_bits(cls, bits: int) -> PartDtype:
        return cls(f"uint{bits}")

    @classmethod
    def for_torch(cls, dtype: torch.dtype) -> PartDtype:
        try:
            return _FROM_TORCH[dtype]
        except KeyError:
            raise ValueError(
                f"{dtype} cannot be stored; use float16, bfloat16 or float32"
            ) from None


_FLOAT_BITS = {PartDtype.FLOAT16: 16, PartDtype.BFLOAT16: 16, PartDtype.FLOAT32: 32}
_FROM_TORCH = {
    torch.float16: PartDtype.FLOAT16,
    torch.bfloat16: PartDtype.BFLOAT16,
    torch.float32: PartDtype.FLOAT32,
}
_TO_TORCH = {v: k for k, v in _FROM_TORCH.items()}
# Bit-compatible integer views, so numpy can fix the byte order (numpy has no bfloat16).
_INT_VIEW = {
    PartDtype.FLOAT16: (torch.int16, "<i2"),
    PartDtype.BFLOAT16: (torch.int16, "<i2"),
    PartDtype.FLOAT32: (torch.int32, "<i4"),
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _little_endian(values: Tensor, dtype: PartDtype) -> Any:
    """``values`` rounded to the float ``dtype``, flat, as a little-endian integer array: a
    view of ``values`` when it already is that (contiguous, at ``dtype``, on a little-endian
    machine), else a new array."""
    int_dtype, np_dtype = _INT_VIEW[dtype]
    stored = values.detach().to(_TO_TORCH[dtype]).contiguous().view(int_dtype).reshape(-1).cpu()
    return stored.numpy().astype(np_dtype, copy=False)


@dataclass(frozen=True)
class Part:
    """One named component of an encoded tensor: ``data`` holds exactly
    ``ceil(nbits / 8)`` bytes for ``nbits = numel(shape) x dtype.bits`` (bytes, or a
    read-only byte view of a tensor the part was given by :meth:`taking_floats`)."""

    name: str
    dtype: PartDtype
    shape: tuple[int, ...]
    data: bytes | memoryview = field(repr=False)

    def __post_init__(self) -> None:
        if any(d < 0 for d in self.shape):
            raise ValueError(f"part {self.name!r}: negative dimension in {self.shape}")
        if len(self.data) != self.byte_length:
            raise ValueError(
                f"part {self.name!r}: {self.dtype} {self.shape} needs {self.byte_length} bytes, "
                f"got {len(self.data)}"
            )

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbits(self) -> int:
        return self.numel * self.dtype.bits

    @property
    def byte_length(self) -> int:
        return packed_nbytes(self.numel, self.dtype.bits)

    @classmethod
    def from_codes(cls, name: str, codes: Tensor, bits: int, packer: CodePacker = pack) -> Part:
        """Integer codes of any shape in ``[0, 2**bits)``, packed by ``packer`` (the
        reference's, or a kernel's on the codes' device)."""
        packed = packer(codes, bits)
        return cls(
            name,
            PartDtype.for_code_bits(bits),
            tuple(codes.shape),
            packed.cpu().numpy().tobytes(),
        )

    @classmethod
    def from_floats(cls, name: str, values: Tensor, dtype: PartDtype) -> Part:
        """Float values of any shape, rounded to ``dtype`` (a float part dtype)."""
        return cls(name, dtype, tuple(values.shape), _little_endian(values, dtype).tobytes())

    @classmethod
    def taking_floats(cls, name: str, values: Tensor, dtype: PartDtype) -> Part:
        """:meth:`from_floats` without the copy when ``values`` is already contiguous at
        ``dtype``: the part then views its memory, so the caller hands the tensor over and
        must not change it afterwards (for tensor-sized parts, where a copy would double
        the memory an encoding takes)."""
        view = memoryview(_little_endian(values, dtype)).cast("B").toreadonly()
        return cls(name, dtype, tuple(values.shape), view)

    def codes(self) -> Tensor:
        """The unpacked uint8 codes, shaped ``shape``."""
        if not self.dtype.is_code:
            raise ValueError(f"part {self.name!r} holds {self.dtype}, not codes")
        if not self.data:
            return torch.zeros(self.shape, dtype=torch.uint8)
        raw = torch.frombuffer(bytearray(self.data), dtype=torch.uint8)
        return unpack(raw, self.dtype.bits, self.numel).view(self.shape)

    def floats(self) -> Tensor:
        """The stored values as fp32, shaped ``shape``."""
        if self.dtype.is_code:
            raise ValueError(f"part {self.name!r} holds {self.dtype} codes, not floats")
        _, np_dtype = _INT_VIEW[self.dtype]
        native = np.frombuffer(self.data, dtype=np_dtype).astype(np_dtype[1:])
        return torch.from_numpy(native).view(_TO_TORCH[self.dtype]).float().view(self.shape)


@dataclass(frozen=True)
class EncodedTensor:
    """A compressed delta of shape ``shape`` (original dtype ``dtype``), decodable by
    ``kernels.reference.decode``. ``nbits`` is the exact payload size: the sum over parts."""

    method: str
    version: int
    shape: tuple[int, ...]
    dtype: str
    params: dict[str, str]
    parts: tuple[Part, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ValueError(f"part names must be unique, got {names}")
        bad = {
            k: v for k, v in self.params.items() if not (isinstance(k, str) and isinstance(v, str))
        }
        if bad:
            raise ValueError(f"params must map str to str, got {bad}")

    @property
    def nbits(self) -> int:
        return sum(p.nbits for p in self.parts)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def ratio(self) -> float:
        """Exact compression against the fp16 delta: numel·16 / nbits."""
        return self.numel * 16 / self.nbits if self.nbits else float("inf")

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise KeyError(
            f"{self.method} encoding has no part {name!r}; parts: {[p.name for p in self.parts]}"
        )

    def to_bytes(self) -> bytes:
        header = {
            "method": self.method,
            "version": self.version,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "params": self.params,
            "parts": [
                {
                    "name": p.name,
                    "dtype": p.dtype.value,
                    "shape": list(p.shape),
                    "nbits": p.nbits,
                    "byte_length": p.byte_length,
                }
                for p in self.parts
            ],
        }
        blob = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(blob))
        return b"".join([prefix, blob, *(p.data for p in self.parts)])

    @classmethod
    def from_bytes(cls, data: bytes) -> EncodedTensor:
        if len(data) < _PREFIX.size:
            raise ValueError(f"{len(data)} bytes is shorter than the {_PREFIX.size}-byte prefix")
        magic, version, header_len = _PREFIX.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"not an encoded tensor: magic {magic!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"encoded tensor format v{version}; this build reads v{FORMAT_VERSION}"
            )
        offset = _PREFIX.size + header_len
        header = json.loads(data[_PREFIX.size : offset])
        parts = []
        for spec in header["parts"]:
            end = offset + spec["byte_length"]
            part = Part(
                spec["name"], PartDtype(spec["dtype"]), tuple(spec["shape"]), data[offset:end]
            )
            if part.nbits != spec["nbits"]:
                raise ValueError(
                    f"part {part.name!r}: header says {spec['nbits']} bits, "
                    f"shape gives {part.nbits}"
                )
            parts.append(part)
            offset = end
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} trailing bytes after the last part")
        return cls(
            header["method"],
            header["version"],
            tuple(header["shape"]),
            header["dtype"],
            dict(header["params"]),
            tuple(parts),
        )


def quantized_parts(
    prefix: str, codes: Tensor, params: QuantParams, packer: CodePacker = pack
) -> list[Part]:
    """Parts ``{prefix}.codes`` (rows, cols) uint{bits}, ``{prefix}.scales`` (rows, n_groups)
    float16 or bfloat16 and, when asymmetric, ``{prefix}.zeros`` (rows, n_groups) float16."""
    parts = [
        Part.from_codes(f"{prefix}.codes", codes, params.bits, packer),
        Part.from_floats(f"{prefix}.scales", params.scale, PartDtype.for_torch(params.scale.dtype)),
    ]
    if params.zero is not None:
        parts.append(Part.from_floats(f"{prefix}.zeros", params.zero, PartDtype.FLOAT16))
    return parts


def read_qparams(encoded: EncodedTensor, prefix: str, bits: int, group_size: int) -> QuantParams:
    """The ``bits``-bit grid stored as ``{prefix}.scales`` and, if present, ``{prefix}.zeros``."""
    names = {p.name for p in encoded.parts}
    scales = encoded.part(f"{prefix}.scales")
    scale = scales.floats().to(scales.dtype.torch_dtype)
    zero = encoded.part(f"{prefix}.zeros").floats().half() if f"{prefix}.zeros" in names else None
    return QuantParams(bits, group_size, scale, zero)


def read_quantized(
    encoded: EncodedTensor, prefix: str, group_size: int
) -> tuple[Tensor, QuantParams]:
    """Inverse of :func:`quantized_parts`: (codes, params) of the matrix under ``prefix``."""
    codes = encoded.part(f"{prefix}.codes")
    return codes.codes(), read_qparams(encoded, prefix, codes.dtype.bits, group_size)
