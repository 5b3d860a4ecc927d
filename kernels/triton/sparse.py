"""DARE and DeltaDQ: ``y += x·ΔŴᵀ`` as a sparse-quantized product over each row's kept
columns (the seeded mask, regenerated once by :mod:`kernels.layout`), the kept values
dequantized from their packed codes as they are loaded; and the dense decode, a scatter."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.layout import SparseStack
from kernels.triton.codes import load_codes, rounded_to
from kernels.triton.segments import row_blocks, segment_rows

BLOCK_N, BLOCK_J = 32, 32


@triton.jit
def _kept(
    stack_columns,
    column_offset,
    width,
    count,
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
    d_out,
    BITS: tl.constexpr,
):
    """(columns, values, mask) of kept entries ``j`` of rows ``n``: (BLOCK_N, BLOCK_J)."""
    row_width = tl.load(width + entry)
    kept = tl.load(count + entry * d_out + n, mask=n_ok, other=0)
    first = tl.load(start + entry * d_out + n, mask=n_ok, other=0)
    ok = n_ok[:, None] & (j[None, :] < kept[:, None])
    columns = tl.load(
        stack_columns
        + tl.load(column_offset + entry)
        + n[:, None].to(tl.int64) * row_width
        + j[None, :],
        mask=ok,
        other=0,
    )
    at = first[:, None] + j[None, :]
    if BITS == 0:  # kernels.layout.FLOAT_VALUES: fp32 floats, not codes
        value = tl.load(values + tl.load(value_offset + entry) + at, mask=ok, other=0.0)
    else:
        offset = tl.load(value_offset + entry)
        code = load_codes(values + offset, at, values_nbytes - offset, ok, BITS)
        grid_at = tl.load(param_offset + entry) + at // tl.load(group_size + entry)
        s = tl.load(scale + grid_at, mask=ok, other=0.0)
        z = tl.load(zero + grid_at, mask=ok, other=0.0)
        value = (code.to(tl.float32) - z) * s
    return columns, tl.where(ok, value, 0.0), ok


@triton.jit
def _sparse_product_kernel(
    x,
    x_stride,
    y,
    y_stride,
    row_offsets,
    stack_segments,
    columns,
    column_offset,
    width,
    count,
    start,
    values,
    value_offset,
    values_nbytes,
    scale,
    zero,
    param_offset,
    group_size,
    d_out,
    BITS: tl.constexpr,
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j_start in range(0, tl.load(width + entry), BLOCK_J):
        j = j_start + tl.arange(0, BLOCK_J)
        cols, value, ok = _kept(
            columns,
            column_offset,
            width,
            count,
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
            d_out,
            BITS,
        )
        a = tl.load(
            x + rows[:, None, None].to(tl.int64) * x_stride + cols[None, :, :],
            mask=row_ok[:, None, None] & ok[None, :, :],
            other=0.0,
        )
        acc += tl.sum(a.to(tl.float32) * value[None, :, :], axis=2)
    target = y + rows[:, None].to(tl.int64) * y_stride + n[None, :]
    out_ok = row_ok[:, None] & n_ok[None, :]
    acc += tl.load(target, mask=out_ok, other=0.0).to(tl.float32)
    tl.store(target, rounded_to(acc, y.dtype.element_ty), mask=out_ok)


@triton.jit
def _sparse_decode_kernel(
    out,
    d_in,
    columns,
    column_offset,
    width,
    count,
    start,
    values,
    value_offset,
    values_nbytes,
    scale,
    zero,
    param_offset,
    group_size,
    entry,
    d_out,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_J: tl.constexpr,
):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    cols, value, ok = _kept(
        columns,
        column_offset,
        width,
        count,
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
        n < d_out,
        j,
        d_out,
        BITS,
    )
    target = out + n[:, None].to(tl.int64) * d_in + cols
    tl.store(target, rounded_to(value, out.dtype.element_ty), mask=ok)


def _stack_args(stack: SparseStack) -> tuple[Tensor | int, ...]:
    return (
        stack.columns,
        stack.column_offset,
        stack.width,
        stack.count,
        stack.start,
        stack.values,
        stack.value_offset,
        stack.values.numel() * stack.values.element_size(),
        stack.scale,
        stack.zero,
        stack.param_offset,
        stack.group_size,
    )


def add_sparse(
    x: Tensor, y: Tensor, offsets: Tensor, rows: Sequence[int], stack: SparseStack
) -> None:
    """``y[rows of s] += x[rows of s]·ΔŴ_sᵀ`` for each sparse segment s of the stack."""
    block_m = 16 if max(rows, default=0) <= 16 else 32
    d_out = y.shape[1]
    grid = (row_blocks(rows, block_m), triton.cdiv(d_out, BLOCK_N), stack.segments.numel())
    _sparse_product_kernel[grid](
        x,
        x.stride(0),
        y,
        y.stride(0),
        offsets,
        stack.segments,
        *_stack_args(stack),
        d_out,
        BITS=stack.bits,
        BLOCK_M=block_m,
        BLOCK_N=BLOCK_N,
        BLOCK_J=BLOCK_J,
    )


def decode_sparse(
    stack: SparseStack, entry: int, shape: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """The dense ΔŴ of entry ``entry`` of the stack: zeros, the kept values scattered."""
    d_out, d_in = shape
    out = torch.zeros(shape, dtype=dtype, device=stack.columns.device)
    grid = (triton.cdiv(d_out, BLOCK_N), triton.cdiv(int(stack.width[entry]), BLOCK_J))
    _sparse_decode_kernel[grid](
        out,
        d_in,
        *_stack_args(stack),
        entry,
        d_out,
        BITS=stack.bits,
        BLOCK_N=BLOCK_N,
        BLOCK_J=BLOCK_J,
    )
    return out
