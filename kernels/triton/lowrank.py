"""x·ΔŴᵀ for low-rank deltas (ADAMIX, Delta-CoMe) as two skinny products with the
dequantization fused into the loads: ``T = (x·V̂ᵀ)·diag(sigma)``, then ``y += T·Ûᵀ``.

One kernel does both: it multiplies activations by a quantized matrix Q (rows grouped
along their columns, packed ``BITS``-bit codes), read as Qᵀ (``TRANSPOSED``, the first
product: Q = V̂ᵀ rows, (rank, d_in)) or as Q (the second: Q = Ûᵀ rows, (rank, d_out)). Each
launch serves every delta of a stack with pairs at one width. The first product splits its
long reduction (d_in) over programs and adds partial sums atomically: its output has only
``rank`` columns, too few programs otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.dispatch import interpreting
from kernels.layout import LowRankStack, QuantRows
from kernels.triton.codes import dot_dtype, group_params, load_codes, mma, rounded_to
from kernels.triton.segments import row_blocks, segment_rows


@triton.jit
def _quantized_product_kernel(
    a,
    a_stride,
    out,
    out_stride,
    row_offsets,
    segments,
    codes,
    code_offset,
    codes_nbytes,
    scale,
    zero,
    param_offset,
    q_rows,
    q_group,
    q_cols,
    sigma,
    sigma_offset,
    split_k,
    BITS: tl.constexpr,
    TRANSPOSED: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    ATOMIC: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    entry = tl.program_id(2)
    block_m, split = tl.program_id(0) // split_k, tl.program_id(0) % split_k
    rows, row_ok, past_rows = segment_rows(row_offsets, segments, entry, block_m, BLOCK_M)
    rank = tl.load(q_rows + entry)
    if TRANSPOSED:
        n_size, k_size = rank, q_cols
    else:
        n_size, k_size = q_cols, rank
    if past_rows or rank == 0 or tl.program_id(1) * BLOCK_N >= n_size:
        return
    group = tl.load(q_group + entry)
    n_groups = tl.cdiv(q_cols, group)
    stream = codes + tl.load(code_offset + entry)
    nbytes = codes_nbytes - tl.load(code_offset + entry)
    grid_at = tl.load(param_offset + entry)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_size
    k_chunk = tl.cdiv(tl.cdiv(k_size, split_k), BLOCK_K) * BLOCK_K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(split * k_chunk, tl.minimum((split + 1) * k_chunk, k_size), BLOCK_K):
        k = k_start + tl.arange(0, BLOCK_K)
        k_ok = k < k_size
        x = tl.load(
            a + rows[:, None].to(tl.int64) * a_stride + k[None, :],
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        # Element (i, j) of Q feeds B[k, n]: i = n, j = k when reading Qᵀ.
        if TRANSPOSED:
            i, j = n[None, :], k[:, None]
        else:
            i, j = k[:, None], n[None, :]
        ok = k_ok[:, None] & n_ok[None, :]
        q = load_codes(stream, i.to(tl.int64) * q_cols + j, nbytes, ok, BITS)
        s, z = group_params(scale + grid_at, zero + grid_at, i, j, n_groups, group, ok, 0.0, True)
        acc = mma(acc, x, tl.where(ok, (q.to(tl.float32) - z) * s, 0.0), DOT_DTYPE)
    if TRANSPOSED:
        acc = (
            acc * tl.load(sigma + tl.load(sigma_offset + entry) + n, mask=n_ok, other=0.0)[None, :]
        )
    target = out + rows[:, None].to(tl.int64) * out_stride + n[None, :]
    ok = row_ok[:, None] & n_ok[None, :]
    if ATOMIC:
        tl.atomic_add(target, acc, mask=ok)
    else:
        if ACCUMULATE:
            acc += tl.load(target, mask=ok, other=0.0).to(tl.float32)
        tl.store(target, rounded_to(acc, out.dtype.element_ty), mask=ok)


def _launch(
    a: Tensor,
    out: Tensor,
    offsets: Tensor,
    rows: Sequence[int],
    stack: LowRankStack,
    q: QuantRows,
    q_cols: int,
    n_max: int,
    *,
    transposed: bool,
    split_k: int,
    blocks: tuple[int, int, int],
) -> None:
    block_m, block_n, block_k = blocks
    grid = (
        row_blocks(rows, block_m) * split_k,
        triton.cdiv(n_max, block_n),
        stack.segments.numel(),
    )
    _quantized_product_kernel[grid](
        a,
        a.stride(0),
        out,
        out.stride(0),
        offsets,
        stack.segments,
        q.codes,
        q.code_offset,
        q.codes.numel(),
        q.scale,
        q.zero,
        q.param_offset,
        q.rows,
        q.group_size,
        q_cols,
        stack.sigma,
        stack.sigma_offset,
        split_k,
        BITS=q.bits,
        TRANSPOSED=transposed,
        ACCUMULATE=not transposed,
        ATOMIC=split_k > 1,
        DOT_DTYPE=dot_dtype(a.dtype),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
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
    """``y[rows of s] += x[rows of s]·ΔŴ_sᵀ`` for the pairs of one width of each segment s."""
    d_in, d_out = x.shape[1], y.shape[1]
    rank = stack.v.max_rows
    if rank == 0:
        return
    block_m = 16 if max(rows, default=0) <= 16 else 64
    block_r = 64 if rank > 32 else 32
    splits = split_k or first_split(
        d_in, row_blocks(rows, block_m) * triton.cdiv(rank, block_r) * stack.segments.numel()
    )
    t = (torch.zeros if splits > 1 else torch.empty)(
        x.shape[0], rank, dtype=torch.float32, device=x.device
    )
    _launch(
        x,
        t,
        offsets,
        rows,
        stack,
        stack.v,
        d_in,
        rank,
        transposed=True,
        split_k=splits,
        blocks=(block_m, block_r, 64),
    )
    _launch(
        t,
        y,
        offsets,
        rows,
        stack,
        stack.u,
        d_out,
        d_out,
        transposed=False,
        split_k=1,
        blocks=(block_m, 64, 32),
    )
