"""DARE and DeltaDQ: ``y += x·ΔŴᵀ`` as a sparse-quantized product, and the dense decode.

Each program walks a block of output rows across ``d_in`` in tiles: it reads which of the
tile's elements are kept, from the layout's bitmap (1 bit per weight) or, with
``SparseMasks.HASH``, by hashing their linear indices (:mod:`.masks`) against their bounds
(fewer bytes, more integer work). It numbers the kept elements in row-major order (a
running count per row plus a cumulative sum across the tile: the order their values are
stored in), dequantizes their codes and multiplies the tile, zeros where dropped, with
``tl.dot``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import SparseMasks, SparseStack
from kernels.triton.codes import dot_dtype, load_codes, mma, rounded_to
from kernels.triton.masks import keys_at
from kernels.triton.segments import row_blocks, segment_rows

BLOCK_N, BLOCK_J = 32, 64


@triton.jit
def _kept_tile(
    bitmap,
    bitmap_offset,
    bitmap_nbytes,
    salt,
    bound,
    bound_offset,
    dropout_group,
    start,
    values,
    value_offset,
    values_nbytes,
    scale,
    zero,
    param_offset,
    group_size,
    entry,
    n,
    n_ok,
    j,
    d_in,
    d_out,
    running,
    FROM_BITMAP: tl.constexpr,
    GROUPED: tl.constexpr,
    BITS: tl.constexpr,
):
    """(values (BLOCK_N, BLOCK_J) fp32, zero where dropped; the rows' running kept counts
    after this tile) of columns ``j`` of rows ``n``."""
    ok = n_ok[:, None] & (j < d_in)[None, :]
    element = n[:, None].to(tl.int64) * d_in + j[None, :]
    if FROM_BITMAP:
        at = tl.load(bitmap_offset + entry)
        kept = ok & (load_codes(bitmap + at, element, bitmap_nbytes - at, ok, 1) != 0)
    else:
        key = keys_at(element, tl.load(salt + entry).to(tl.uint32))
        if GROUPED:
            group = tl.load(dropout_group + entry)
            at = tl.load(bound_offset + entry) + n[:, None].to(tl.int64) * tl.cdiv(d_in, group)
            limit = tl.load(bound + at + j[None, :] // group, mask=ok, other=0)
            limit = limit.to(tl.uint32, bitcast=True).to(tl.int64)
        else:
            limit = tl.load(bound + entry)
        kept = ok & (key <= limit)
    count = kept.to(tl.int32)
    first = tl.load(start + entry * d_out + n, mask=n_ok, other=0)
    index = first[:, None] + (running[:, None] + tl.cumsum(count, axis=1) - count)
    if BITS == 0:  # kernels.layout.FLOAT_VALUES: floats, not codes
        value = tl.load(values + tl.load(value_offset + entry) + index, mask=kept, other=0.0)
    else:
        offset = tl.load(value_offset + entry)
        code = load_codes(values + offset, index, values_nbytes - offset, kept, BITS)
        grid_at = tl.load(param_offset + entry) + index // tl.load(group_size + entry)
        s = tl.load(scale + grid_at, mask=kept, other=0.0)
        z = tl.load(zero + grid_at, mask=kept, other=0.0)
        value = (code.to(tl.float32) - z) * s
    return tl.where(kept, value.to(tl.float32), 0.0), running + tl.sum(count, axis=1)


@triton.jit
def _sparse_product_kernel(
    x,
    x_stride,
    y,
    y_stride,
    row_offsets,
    stack_segments,
    bitmap,
    bitmap_offset,
    bitmap_nbytes,
    salt,
    bound,
    bound_offset,
    dropout_group,
    start,
    values,
    value_offset,
    values_nbytes,
    scale,
    zero,
    param_offset,
    group_size,
    d_in,
    d_out,
    FROM_BITMAP: tl.constexpr,
    GROUPED: tl.constexpr,
    BITS: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    entry = tl.program_id(2)
    rows, row_ok, past_rows = segment_rows(
        row_offsets, stack_segments, entry, tl.program_id(0), BLOCK_M
    )
    if past_rows:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_out
    running = tl.zeros((BLOCK_N,), dtype=tl.int32)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j_start in range(0, d_in, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        w, running = _kept_tile(
            bitmap, bitmap_offset, bitmap_nbytes, salt, bound, bound_offset, dropout_group,
            start, values, value_offset, values_nbytes, scale, zero, param_offset, group_size,
            entry, n, n_ok, j, d_in, d_out, running, FROM_BITMAP, GROUPED, BITS,
        )  # fmt: skip
        a = tl.load(
            x + rows[:, None].to(tl.int64) * x_stride + j[None, :],
            mask=row_ok[:, None] & (j < d_in)[None, :],
            other=0.0,
        )
        acc = mma(acc, a, tl.trans(w), DOT_DTYPE)
    target = y + rows[:, None].to(tl.int64) * y_stride + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    acc += tl.load(target, mask=ok, other=0.0).to(tl.float32)
    tl.store(target, rounded_to(acc, y.dtype.element_ty), mask=ok)


@triton.jit
def _sparse_decode_kernel(
    out,
    bitmap,
    bitmap_offset,
    bitmap_nbytes,
    salt,
    bound,
    bound_offset,
    dropout_group,
    start,
    values,
    value_offset,
    values_nbytes,
    scale,
    zero,
    param_offset,
    group_size,
    entry,
    d_in,
    d_out,
    FROM_BITMAP: tl.constexpr,
    GROUPED: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_out
    running = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for j_start in range(0, d_in, BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        w, running = _kept_tile(
            bitmap, bitmap_offset, bitmap_nbytes, salt, bound, bound_offset, dropout_group,
            start, values, value_offset, values_nbytes, scale, zero, param_offset, group_size,
            entry, n, n_ok, j, d_in, d_out, running, FROM_BITMAP, GROUPED, BITS,
        )  # fmt: skip
        target = out + n[:, None].to(tl.int64) * d_in + j[None, :]
        tl.store(
            target, rounded_to(w, out.dtype.element_ty), mask=n_ok[:, None] & (j < d_in)[None, :]
        )


def _stack_args(stack: SparseStack) -> tuple[Tensor | int, ...]:
    return (
        stack.bitmap,
        stack.bitmap_offset,
        stack.bitmap.numel(),
        stack.salt,
        stack.bound,
        stack.bound_offset,
        stack.dropout_group,
        stack.start,
        stack.values,
        stack.value_offset,
        stack.values.numel(),
        stack.scale,
        stack.zero,
        stack.param_offset,
        stack.group_size,
    )


def add_sparse(
    x: Tensor, y: Tensor, offsets: Tensor, rows: Sequence[int], stack: SparseStack
) -> None:
    """``y[rows of s] += x[rows of s]·ΔŴ_sᵀ`` for each sparse segment s of the stack."""
    block_m = 16 if max(rows, default=0) <= 16 else 64
    d_in, d_out = x.shape[1], y.shape[1]
    grid = (row_blocks(rows, block_m), triton.cdiv(d_out, BLOCK_N), stack.segments.numel())
    _sparse_product_kernel[grid](
        x,
        x.stride(0),
        y,
        y.stride(0),
        offsets,
        stack.segments,
        *_stack_args(stack),
        d_in,
        d_out,
        FROM_BITMAP=stack.masks is SparseMasks.BITMAP,
        GROUPED=stack.grouped,
        BITS=stack.bits,
        DOT_DTYPE=dot_dtype(x.dtype),
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_J=BLOCK_J,
    )


def decode_sparse(
    stack: SparseStack, entry: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """The dense ΔŴ of entry ``entry`` of the stack."""
    d_out, d_in = shape
    out = torch.empty(shape, dtype=dtype, device=stack.values.device)
    _sparse_decode_kernel[(triton.cdiv(d_out, BLOCK_N),)](
        out,
        *_stack_args(stack),
        entry,
        d_in,
        d_out,
        FROM_BITMAP=stack.masks is SparseMasks.BITMAP,
        GROUPED=stack.grouped,
        BITS=stack.bits,
        BLOCK_N=BLOCK_N,
        BLOCK_J=BLOCK_J,
    )
    return out
