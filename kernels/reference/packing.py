"""Bit packing of 1-8-bit unsigned codes into a uint8 stream.

Layout (one for every width): a little-endian bitstream. Code ``i`` of width ``b`` occupies
stream bits ``[i*b, (i+1)*b)``, least significant bit first; stream bit ``s`` is bit ``s % 8``
of byte ``s // 8``. ``n`` codes take exactly ``ceil(n*b/8)`` bytes and the unused high bits of
the last byte are zero, so the payload costs ``n*b`` bits plus less than one byte of padding.

Widths that divide 8 pack whole codes into each byte; the others pack 8 codes into ``b``
bytes through a 64-bit word (8 x 7 bits = 56 bits, so no int64 overflow).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Packer = Callable[[Tensor], Tensor]
Unpacker = Callable[[Tensor, int], Tensor]


def packed_nbytes(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits occupy."""
    return (n * bits + 7) // 8


def _pad_to_multiple(flat: Tensor, multiple: int) -> Tensor:
    pad = (-flat.numel()) % multiple
    if pad == 0:
        return flat
    return torch.cat([flat, flat.new_zeros(pad)])


def _pack_within_byte(codes: Tensor, bits: int) -> Tensor:
    """(n,) codes of a width dividing 8 → (ceil(n*bits/8),) uint8."""
    per_byte = 8 // bits
    grouped = _pad_to_multiple(codes.to(torch.int32), per_byte).view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    # Fields are disjoint, so the sum is the bitwise OR.
    return (grouped << shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def _unpack_within_byte(packed: Tensor, bits: int, n: int) -> Tensor:
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    fields = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return fields.reshape(-1)[:n].to(torch.uint8)


def _pack_octets(codes: Tensor, bits: int) -> Tensor:
    """(n,) codes of any width 1-7 → (ceil(n*bits/8),) uint8, 8 codes per ``bits`` bytes."""
    n = codes.numel()
    octets = _pad_to_multiple(codes.to(torch.int64), 8).view(-1, 8)
    words = (octets << (torch.arange(8, dtype=torch.int64) * bits)).sum(dim=1)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    stream = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).reshape(-1)
    return stream[: packed_nbytes(n, bits)].to(torch.uint8)


def _unpack_octets(packed: Tensor, bits: int, n: int) -> Tensor:
    stream = _pad_to_multiple(packed.to(torch.int64), bits).view(-1, bits)
    words = (stream << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=1)
    code_shifts = torch.arange(8, dtype=torch.int64) * bits
    fields = (words.unsqueeze(1) >> code_shifts) & ((1 << bits) - 1)
    return fields.reshape(-1)[:n].to(torch.uint8)


def pack_1bit_u8(codes: Tensor) -> Tensor:
    return _pack_within_byte(codes, 1)


def pack_2bit_u8(codes: Tensor) -> Tensor:
    return _pack_within_byte(codes, 2)


def pack_3bit_u8(codes: Tensor) -> Tensor:
    return _pack_octets(codes, 3)


def pack_4bit_u8(codes: Tensor) -> Tensor:
    return _pack_within_byte(codes, 4)


def pack_5bit_u8(codes: Tensor) -> Tensor:
    return _pack_octets(codes, 5)


def pack_6bit_u8(codes: Tensor) -> Tensor:
    return _pack_octets(codes, 6)


def pack_7bit_u8(codes: Tensor) -> Tensor:
    return _pack_octets(codes, 7)


def pack_8bit_u8(codes: Tensor) -> Tensor:
    return codes.to(torch.uint8).clone()


def unpack_1bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_within_byte(packed, 1, n)


def unpack_2bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_within_byte(packed, 2, n)


def unpack_3bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_octets(packed, 3, n)


def unpack_4bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_within_byte(packed, 4, n)


def unpack_5bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_octets(packed, 5, n)


def unpack_6bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_octets(packed, 6, n)


def unpack_7bit_u8(packed: Tensor, n: int) -> Tensor:
    return _unpack_octets(packed, 7, n)


def unpack_8bit_u8(packed: Tensor, n: int) -> Tensor:
    return packed[:n].to(torch.uint8).clone()


BIT_TO_PACKING: dict[int, tuple[Packer, Unpacker]] = {
    1: (pack_1bit_u8, unpack_1bit_u8),
    2: (pack_2bit_u8, unpack_2bit_u8),
    3: (pack_3bit_u8, unpack_3bit_u8),
    4: (pack_4bit_u8, unpack_4bit_u8),
    5: (pack_5bit_u8, unpack_5bit_u8),
    6: (pack_6bit_u8, unpack_6bit_u8),
    7: (pack_7bit_u8, unpack_7bit_u8),
    8: (pack_8bit_u8, unpack_8bit_u8),
}


def _packing(bits: int) -> tuple[Packer, Unpacker]:
    try:
        return BIT_TO_PACKING[bits]
    except KeyError:
        raise ValueError(f"code width must be 1..8 bits, got {bits}") from None


def check_codes(flat: Tensor, bits: int) -> None:
    """ValueError unless ``bits`` is a code width and every code fits in it."""
    _packing(bits)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(
            f"codes span [{int(flat.min())}, {int(flat.max())}], outside [0, {(1 << bits) - 1}] "
            f"for {bits}-bit packing"
        )


def check_stream(packed: Tensor, bits: int, n: int) -> None:
    """ValueError unless ``packed`` is the 1-D uint8 stream of ``n`` ``bits``-bit codes."""
    _packing(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} {packed.dim()}-D"
        )
    if packed.numel() != packed_nbytes(n, bits):
        raise ValueError(
            f"{n} codes of {bits} bits need {packed_nbytes(n, bits)} bytes, got {packed.numel()}"
        )


def pack(codes: Tensor, bits: int) -> Tensor:
    """Any-shape integer codes in ``[0, 2**bits)`` → (ceil(numel*bits/8),) uint8, row-major."""
    flat = codes.reshape(-1)
    check_codes(flat, bits)
    packer, _ = _packing(bits)
    return packer(flat)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """(ceil(n*bits/8),) uint8 → (n,) uint8 codes; inverse of :func:`pack`."""
    check_stream(packed, bits, n)
    _, unpacker = _packing(bits)
    return unpacker(packed, n)
