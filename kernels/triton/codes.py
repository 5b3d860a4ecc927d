"""Group-wise codes in Triton: quantize, pack, unpack, dequantize.

Same formats as :mod:`kernels.reference.quant` and :mod:`kernels.reference.packing`, bit for
bit: codes are ``clamp(round_half_even(w / s + z), 0, 2**b - 1)`` with an IEEE division, a
packed stream puts code ``i`` at bits ``[i*b, (i+1)*b)`` LSB first. Packing works on octets:
8 codes of ``b`` bits are one ``8*b``-bit word, stored as ``b`` bytes, for every width.

The ``@triton.jit`` helpers here (:func:`load_codes`, :func:`group_params`) are the loads
the fused delta products use too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import interpreting
from kernels.reference.packing import check_codes, check_stream, packed_nbytes
from kernels.reference.quant import QuantParams, n_groups

ENCODE_OCTETS = 512
"""Octets (8 codes) per program of the quantize/pack kernel."""
DECODE_BLOCK = 4096
"""Codes per program of the unpack/dequantize kernel."""


@triton.jit
def load_codes(stream, index, nbytes, mask, BITS: tl.constexpr):
    """int32 codes at int64 ``index`` of a packed stream of ``nbytes`` bytes (0 where not
    ``mask``), ``BITS`` wide."""
    return load_codes_of_width(stream, index, nbytes, mask, BITS, 8 % BITS != 0)


@triton.jit
def load_codes_of_width(stream, index, nbytes, mask, bits, STRADDLES: tl.constexpr):
    """:func:`load_codes` for a width known only at run time (``STRADDLES`` True: a code
    may straddle two bytes, as every width that does not divide 8 does)."""
    bit = index * bits
    byte = bit >> 3
    word = tl.load(stream + byte, mask=mask, other=0).to(tl.int32)
    if STRADDLES:
        high = tl.load(stream + byte + 1, mask=mask & (byte + 1 < nbytes), other=0)
        word = word | (high.to(tl.int32) << 8)
    return (word >> (bit & 7).to(tl.int32)) & ((1 << bits) - 1)


@triton.jit
def group_params(scale, zero, row, col, n_groups, group_size, mask, mid, HAS_ZERO: tl.constexpr):
    """fp32 (scale, zero) of element (``row``, ``col``) of a matrix grouped along its rows;
    a symmetric grid's zero is the constant ``mid``."""
    at = row * n_groups + col // group_size
    s = tl.load(scale + at, mask=mask, other=1.0).to(tl.float32)
    if HAS_ZERO:
        z = tl.load(zero + at, mask=mask, other=0.0).to(tl.float32)
    else:
        z = tl.zeros_like(s) + mid
    return s, z


@triton.jit
def rounded_to(value, DTYPE: tl.constexpr):
    """fp32 ``value`` rounded to nearest-even ``DTYPE``. bfloat16 is rounded on the bits:
    Triton's interpreter truncates (or rounds ties up) where CUDA rounds to nearest-even."""
    if DTYPE == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return value.to(DTYPE)


@triton.jit
def mma(acc, a, b, DOT_DTYPE: tl.constexpr):
    """``acc + a @ b`` with the operands at ``DOT_DTYPE`` (fp32: IEEE products, not TF32)."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc)


@triton.jit
def _round_half_even(v):
    floor = tl.floor(v)
    frac = v - floor
    odd = floor - 2.0 * tl.floor(floor * 0.5)
    return tl.where(frac > 0.5, floor + 1.0, tl.where(frac < 0.5, floor, floor + odd))


@triton.jit
def _encode_kernel(
    src,
    scale,
    zero,
    out,
    n,
    cols,
    n_groups,
    group_size,
    nbytes,
    mid,
    BITS: tl.constexpr,
    QUANTIZE: tl.constexpr,
    PACK: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    OCTETS: tl.constexpr,
):
    octet = tl.program_id(0).to(tl.int64) * OCTETS + tl.arange(0, OCTETS)
    lane = tl.arange(0, 8)
    index = octet[:, None] * 8 + lane[None, :]
    inside = index < n
    if QUANTIZE:
        w = tl.load(src + index, mask=inside, other=0.0).to(tl.float32)
        s, z = group_params(
            scale, zero, index // cols, index % cols, n_groups, group_size, inside, mid, HAS_ZERO
        )
        q = _round_half_even(tl.div_rn(w, s) + z)
        q = tl.minimum(tl.maximum(q, 0.0), (1 << BITS) - 1.0)
        codes = tl.where(inside, q.to(tl.int32), 0)
    else:
        codes = tl.load(src + index, mask=inside, other=0).to(tl.int32)
    if PACK:
        shifts = (lane * BITS).to(tl.uint64)
        # The fields are disjoint, so their sum is their bitwise OR.
        word = tl.sum(codes.to(tl.uint64) << shifts[None, :], axis=1)
        for j in tl.static_range(BITS):
            byte = octet * BITS + j
            tl.store(out + byte, ((word >> (8 * j)) & 0xFF).to(tl.uint8), mask=byte < nbytes)
    else:
        tl.store(out + index, codes.to(tl.uint8), mask=inside)


@triton.jit
def _decode_kernel(
    packed,
    scale,
    zero,
    out,
    n,
    cols,
    n_groups,
    group_size,
    nbytes,
    mid,
    BITS: tl.constexpr,
    DEQUANTIZE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < n
    codes = load_codes(packed, index, nbytes, inside, BITS)
    if DEQUANTIZE:
        s, z = group_params(
            scale, zero, index // cols, index % cols, n_groups, group_size, inside, mid, HAS_ZERO
        )
        value = (codes.to(tl.float32) - z) * s
        tl.store(out + index, rounded_to(value, out.dtype.element_ty), mask=inside)
    else:
        tl.store(out + index, codes.to(tl.uint8), mask=inside)


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The operand type of ``tl.dot`` for activations of ``dtype``: fp16 and bf16 as they
    are, fp32 exact. The interpreter's bf16 dot is broken upstream, so it gets fp32."""
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not interpreting():
        return tl.bfloat16
    return tl.float32


def _grid_params(params: QuantParams, rows: int, cols: int) -> tuple[Tensor, Tensor, float]:
    """(scale, zero or a stand-in, symmetric zero) of ``params`` for a (rows, cols) matrix."""
    expected = (rows, n_groups(cols, params.group_size))
    if tuple(params.scale.shape) != expected:
        raise ValueError(
            f"scales {tuple(params.scale.shape)} do not fit a ({rows}, {cols}) matrix in "
            f"groups of {params.group_size}: expected {expected}"
        )
    scale = params.scale.contiguous()
    zero = scale if params.zero is None else params.zero.contiguous()
    return scale, zero, ((1 << params.bits) - 1) / 2


def _encode(src: Tensor, bits: int, out: Tensor, params: QuantParams | None, pack: bool) -> Tensor:
    rows, cols = (src.shape[0], src.shape[1]) if src.dim() == 2 else (1, src.numel())
    scale, zero, mid = (src, src, 0.0) if params is None else _grid_params(params, rows, cols)
    group_size = 1 if params is None else params.group_size
    n = src.numel()
    grid = (max(1, triton.cdiv(n, 8 * ENCODE_OCTETS)),)
    _encode_kernel[grid](
        src.contiguous(),
        scale,
        zero,
        out,
        n,
        max(cols, 1),
        scale.shape[-1] if params is not None else 1,
        group_size,
        out.numel(),
        mid,
        BITS=bits,
        QUANTIZE=params is not None,
        PACK=pack,
        HAS_ZERO=params is not None and params.zero is not None,
        OCTETS=ENCODE_OCTETS,
    )
    return out


def quantize(w: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) float → (rows, cols) uint8 codes: ``kernels.reference.quantize``."""
    _check_matrix(w)
    out = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    return _encode(w, params.bits, out, params, pack=False)


def quantize_packed(w: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) float → its codes packed, ``pack(quantize(w, params), bits)``, in one
    pass (the codes never reach memory unpacked)."""
    _check_matrix(w)
    out = torch.empty(packed_nbytes(w.numel(), params.bits), dtype=torch.uint8, device=w.device)
    return _encode(w, params.bits, out, params, pack=True)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Any-shape integer codes → (ceil(numel*bits/8),) uint8: ``kernels.reference.pack``."""
    flat = codes.reshape(-1)
    check_codes(flat, bits)
    out = torch.empty(packed_nbytes(flat.numel(), bits), dtype=torch.uint8, device=codes.device)
    return _encode(flat, bits, out, None, pack=True)


def decode_stream(
    packed: Tensor,
    bits: int,
    out: Tensor,
    cols: int,
    grid: tuple[Tensor, Tensor, int, float, bool] | None,
) -> Tensor:
    """Unpack (``grid`` None) or dequantize the ``out.numel()`` codes of ``packed`` into
    ``out``, a row-major matrix of ``cols`` columns. ``grid`` is (scale, zero, group_size,
    symmetric zero, has zero), scales and zeros of any float dtype, (rows, n_groups)."""
    n = out.numel()
    scale, zero, group_size, mid, has_zero = grid or (packed, packed, 1, 0.0, False)
    _decode_kernel[(max(1, triton.cdiv(n, DECODE_BLOCK)),)](
        packed,
        scale,
        zero,
        out,
        n,
        max(cols, 1),
        triton.cdiv(cols, group_size),
        group_size,
        packed.numel(),
        mid,
        BITS=bits,
        DEQUANTIZE=grid is not None,
        HAS_ZERO=has_zero,
        BLOCK=DECODE_BLOCK,
    )
    return out


def _decode(
    packed: Tensor, bits: int, n: int, out: Tensor, params: QuantParams | None, cols: int
) -> Tensor:
    check_stream(packed, bits, n)
    if params is None:
        return decode_stream(packed, bits, out, cols, None)
    scale, zero, mid = _grid_params(params, n // cols if cols else 0, cols)
    grid = (scale, zero, params.group_size, mid, params.zero is not None)
    return decode_stream(packed, bits, out, cols, grid)


def unpack(packed: Tensor, bits: int, n: int) -> Tensor:
    """(ceil(n*bits/8),) uint8 → (n,) uint8 codes: ``kernels.reference.unpack``."""
    out = torch.empty(n, dtype=torch.uint8, device=packed.device)
    return _decode(packed, bits, n, out, None, n)


def dequantize_packed(
    packed: Tensor, shape: tuple[int, int], params: QuantParams, dtype: torch.dtype
) -> Tensor:
    """The ``shape`` matrix of ``dtype`` that packed codes stand for, in one pass."""
    rows, cols = shape
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    return _decode(packed, params.bits, rows * cols, out, params, cols)


def dequantize(codes: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) uint8 codes → fp32: ``kernels.reference.dequantize``. Unpacked codes are
    a stream of 8-bit codes; the grid's own width only sets the symmetric zero."""
    _check_matrix(codes)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    return _decode(codes.contiguous().view(-1), 8, codes.numel(), out, params, codes.shape[1])


def _check_matrix(t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"expected a (rows, cols) matrix, got shape {tuple(t.shape)}")
