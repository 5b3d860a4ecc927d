"""x·ΔŴᵀ for low-rank deltas (ADAMIX, Delta-CoMe) as two skinny products with the
dequantization fused into the loads: ``T = (x·V̂ᵀ)·diag(sigma)``, then ``y += T·Ûᵀ``.

A bucket is one delta's pairs at one code width; its V̂ᵀ rows (rank, d_in) and Ûᵀ rows
(rank, d_out) are packed codes grouped along their rows. Both products multiply
activations by such a quantized matrix Q, read as Qᵀ in the first (B[k, n] = V̂ᵀ[n, k]) and
as Q in the second (B[k, n] = Ûᵀ[k, n]), with the width a run-time value so that one launch
serves every bucket of every delta:

- the first runs one bucket per program group and writes the bucket's columns of T; its
  reduction (d_in) is long and its output narrow, so it is split across programs whose
  partial sums are added atomically;
- the second runs one delta per program group and loops over that delta's buckets, so all
  of its widths add into its rows of y in one program.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import interpreting
from kernels.layout import LowRankStack, QuantRows
from kernels.triton.codes import (
    dot_dtype,
    group_params,
    load_codes_of_width,
    mma,
    rounded_to,
)
from kernels.triton.segments import row_blocks, segment_rows

BLOCK_K_FIRST, BLOCK_N_SECOND, BLOCK_K_SECOND = 64, 64, 32


@triton.jit
def _bucket_product(
    acc,
    a,
    a_stride,
    a_column,
    rows,
    row_ok,
    n,
    n_ok,
    k_start,
    k_stop,
    codes,
    code_offset,
    codes_nbytes,
    scale,
    zero,
    param_offset,
    q_group,
    q_bits,
    q_cols,
    bucket,
    TRANSPOSED: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc + a[rows, a_column + k]·B[k, n]`` over ``k`` in [k_start, k_stop), B read from
    the bucket's quantized matrix (Qᵀ when ``TRANSPOSED``)."""
    bits = tl.load(q_bits + bucket)
    group = tl.load(q_group + bucket)
    n_groups = tl.cdiv(q_cols, group)
    stream = codes + tl.load(code_offset + bucket)
    nbytes = codes_nbytes - tl.load(code_offset + bucket)
    grid_at = tl.load(param_offset + bucket)
    for k0 in range(k_start, k_stop, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < k_stop
        x = tl.load(
            a + rows[:, None].to(tl.int64) * a_stride + a_column + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if TRANSPOSED:
            i, j = n[None, :], k[:, None]
        else:
            i, j = k[:, None], n[None, :]
        ok = k_ok[:, None] & n_ok[None, :]
        q = load_codes_of_width(stream, i.to(tl.int64) * q_cols + j, nbytes, ok, bits, True)
        s, z = group_params(scale + grid_at, zero + grid_at, i, j, n_groups, group, ok, 0.0, True)
        acc = mma(acc, x, tl.where(ok, (q.to(tl.float32) - z) * s, 0.0), DOT_DTYPE)
    return acc


@triton.jit
def _first_product_kernel(
    x,
    x_stride,
    t,
    t_stride,
    row_offsets,
    bucket_segment,
    t_column,
    codes,
    code_offset,
    codes_nbytes,
    scale,
    zero,
    param_offset,
    q_group,
    q_bits,
    q_rows,
    d_in,
    sigma,
    sigma_offset,
    split_k,
    ATOMIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    bucket = tl.program_id(2)
    block_m, split = tl.program_id(0) // split_k, tl.program_id(0) % split_k
    rows, row_ok, past_rows = segment_rows(row_offsets, bucket_segment, bucket, block_m, BLOCK_M)
    rank = tl.load(q_rows + bucket)
    if past_rows or tl.program_id(1) * BLOCK_N >= rank:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < rank
    k_chunk = tl.cdiv(tl.cdiv(d_in, split_k), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _bucket_product(
        acc, x, x_stride, 0, rows, row_ok, n, n_ok,
        split * k_chunk, tl.minimum((split + 1) * k_chunk, d_in),
        codes, code_offset, codes_nbytes, scale, zero, param_offset, q_group, q_bits, d_in,
        bucket, True, DOT_DTYPE, BLOCK_K,
    )  # fmt: skip
    acc *= tl.load(sigma + tl.load(sigma_offset + bucket) + n, mask=n_ok, other=0.0)[None, :]
    target = t + rows[:, None].to(tl.int64) * t_stride + tl.load(t_column + bucket) + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(target, acc, mask=ok)
    else:
        tl.store(target, acc, mask=ok)


@triton.jit
def _second_product_kernel(
    t,
    t_stride,
    y,
    y_stride,
    row_offsets,
    segments,
    bucket_first,
    t_column,
    codes,
    code_offset,
    codes_nbytes,
    scale,
    zero,
    param_offset,
    q_group,
    q_bits,
    q_rows,
    d_out,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    group = tl.program_id(2)
    rows, row_ok, past_rows = segment_rows(row_offsets, segments, group, tl.program_id(0), BLOCK_M)
    if past_rows:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for bucket in range(tl.load(bucket_first + group), tl.load(bucket_first + group + 1)):
        acc = _bucket_product(
            acc, t, t_stride, tl.load(t_column + bucket), rows, row_ok, n, n_ok,
            0, tl.load(q_rows + bucket),
            codes, code_offset, codes_nbytes, scale, zero, param_offset, q_group, q_bits, d_out,
            bucket, False, DOT_DTYPE, BLOCK_K,
        )  # fmt: skip
    target = y + rows[:, None].to(tl.int64) * y_stride + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    acc += tl.load(target, mask=ok, other=0.0).to(tl.float32)
    tl.store(target, rounded_to(acc, y.dtype.element_ty), mask=ok)


def _quantized(q: QuantRows) -> tuple[Tensor | int, ...]:
    return (
        q.codes,
        q.code_offset,
        q.codes.numel(),
        q.scale,
        q.zero,
        q.param_offset,
        q.group_size,
        q.bits,
        q.rows,
    )


def first_split(d_in: int, programs: int) -> int:
    """Reduction splits of the first product: enough programs to fill a GPU (about 264),
    each still reducing at least 256 inputs; one under the interpreter."""
    if interpreting():
        return 1
    return max(1, min(d_in // 256, int(triton.cdiv(264, max(programs, 1)))))


def add_low_rank(
    x: Tensor,
    y: Tensor,
    offsets: Tensor,
    rows: Sequence[int],
    stack: LowRankStack,
    *,
    split_k: int | None = None,
) -> None:
    """``y[rows of s] += x[rows of s]·ΔŴ_sᵀ`` for every low-rank segment s of the stack:
    two launches, whatever the deltas and their widths."""
    if stack.max_rank == 0:
        return
    d_in, d_out = x.shape[1], y.shape[1]
    block_m = 16 if max(rows, default=0) <= 16 else 64
    block_r = 64 if stack.max_bucket_rank > 32 else 32
    buckets = stack.bucket_segment.numel()
    first_grid = (row_blocks(rows, block_m), triton.cdiv(stack.max_bucket_rank, block_r), buckets)
    splits = split_k or first_split(d_in, first_grid[0] * first_grid[1] * buckets)
    # Atomic partial sums need a zeroed T; columns past a delta's rank are never read.
    t = (torch.zeros if splits > 1 else torch.empty)(
        x.shape[0], stack.max_rank, dtype=torch.float32, device=x.device
    )
    _first_product_kernel[(first_grid[0] * splits, *first_grid[1:])](
        x, x.stride(0), t, t.stride(0), offsets, stack.bucket_segment, stack.t_column,
        *_quantized(stack.v), d_in, stack.sigma, stack.sigma_offset, splits,
        ATOMIC=splits > 1, DOT_DTYPE=dot_dtype(x.dtype),
        BLOCK_M=block_m, BLOCK_N=block_r, BLOCK_K=BLOCK_K_FIRST,
    )  # fmt: skip
    second_grid = (
        row_blocks(rows, block_m),
        triton.cdiv(d_out, BLOCK_N_SECOND),
        stack.segments.numel(),
    )
    _second_product_kernel[second_grid](
        t, t.stride(0), y, y.stride(0), offsets, stack.segments, stack.bucket_first,
        stack.t_column, *_quantized(stack.u), d_out,
        DOT_DTYPE=dot_dtype(t.dtype),
        BLOCK_M=block_m, BLOCK_N=BLOCK_N_SECOND, BLOCK_K=BLOCK_K_SECOND,
    )  # fmt: skip
