"""BitDelta: ``y += Σ_l (x·S_lᵀ) ⊙ scale_l`` with S_l = 2·bits_l - 1 read from packed sign
bits, one level at a time, its per-row scale applied to that level's partial sum; and the
dense decode ``ΔŴ = Σ_l scale_l ⊙ S_l``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import SignStack
from kernels.triton.codes import dot_dtype, load_codes, mma, rounded_to
from kernels.triton.segments import row_blocks, segment_rows

BLOCK_N, BLOCK_K = 64, 64
DECODE_BLOCK_N, DECODE_BLOCK_K = 16, 256


@triton.jit
def _sign_product_kernel(
    x,
    x_stride,
    y,
    y_stride,
    row_offsets,
    stack_segments,
    signs,
    sign_offset,
    signs_nbytes,
    levels,
    scale,
    scale_offset,
    d_in,
    d_out,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    entry = tl.program_id(2)
    rows, row_ok, past_rows = segment_rows(
        row_offsets, stack_segments, entry, tl.program_id(0), BLOCK_M
    )
    if past_rows:
        return
    stream = signs + tl.load(sign_offset + entry)
    nbytes = signs_nbytes - tl.load(sign_offset + entry)
    scales = scale + tl.load(scale_offset + entry)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for level in range(tl.load(levels + entry)):
        partial = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_start in range(0, d_in, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            k_ok = k < d_in
            a = tl.load(
                x + rows[:, None].to(tl.int64) * x_stride + k[None, :],
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            ok = k_ok[:, None] & n_ok[None, :]
            at = (level * d_out + n[None, :]).to(tl.int64) * d_in + k[:, None]
            bit = load_codes(stream, at, nbytes, ok, 1)
            partial = mma(partial, a, tl.where(ok, bit.to(tl.float32) * 2.0 - 1.0, 0.0), DOT_DTYPE)
        row_scale = tl.load(scales + level * d_out + n, mask=n_ok, other=0.0)
        acc += partial * row_scale[None, :]
    target = y + rows[:, None].to(tl.int64) * y_stride + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    acc += tl.load(target, mask=ok, other=0.0).to(tl.float32)
    tl.store(target, rounded_to(acc, y.dtype.element_ty), mask=ok)


@triton.jit
def _sign_decode_kernel(
    out,
    signs,
    signs_nbytes,
    levels,
    scale,
    d_in,
    d_out,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (n < d_out)[:, None] & (k < d_in)[None, :]
    value = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for level in range(levels):
        at = (level * d_out + n[:, None]).to(tl.int64) * d_in + k[None, :]
        bit = load_codes(signs, at, signs_nbytes, ok, 1)
        row_scale = tl.load(scale + level * d_out + n, mask=n < d_out, other=0.0)
        value += row_scale[:, None] * (bit.to(tl.float32) * 2.0 - 1.0)
    target = out + n[:, None].to(tl.int64) * d_in + k[None, :]
    tl.store(target, rounded_to(value, out.dtype.element_ty), mask=ok)


def add_signs(x: Tensor, y: Tensor, offsets: Tensor, rows: Sequence[int], stack: SignStack) -> None:
    """``y[rows of s] += x[rows of s]·ΔŴ_sᵀ`` for each BitDelta segment s of the stack."""
    block_m = 16 if max(rows, default=0) <= 16 else 64
    d_in, d_out = x.shape[1], y.shape[1]
    grid = (row_blocks(rows, block_m), triton.cdiv(d_out, BLOCK_N), stack.segments.numel())
    _sign_product_kernel[grid](
        x,
        x.stride(0),
        y,
        y.stride(0),
        offsets,
        stack.segments,
        stack.signs,
        stack.sign_offset,
        stack.signs.numel(),
        stack.levels,
        stack.scale,
        stack.scale_offset,
        d_in,
        d_out,
        DOT_DTYPE=dot_dtype(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
    )


def decode_signs(
    stack: SignStack, entry: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """The dense ΔŴ of entry ``entry`` of the stack."""
    d_out, d_in = shape
    start = int(stack.sign_offset[entry])
    out = torch.empty(shape, dtype=dtype, device=stack.signs.device)
    grid = (triton.cdiv(d_out, DECODE_BLOCK_N), triton.cdiv(d_in, DECODE_BLOCK_K))
    _sign_decode_kernel[grid](
        out,
        stack.signs[start:],
        stack.signs.numel() - start,
        int(stack.levels[entry]),
        stack.scale[int(stack.scale_offset[entry]) :],
        d_in,
        d_out,
        BLOCK_N=DECODE_BLOCK_N,
        BLOCK_K=DECODE_BLOCK_K,
    )
    return out
