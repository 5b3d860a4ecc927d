"""The Triton backend of :mod:`kernels.ops`: the base product by torch (cuBLAS), each
format's delta product added into it by its kernel, and the dense decodes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor

from kernels.layout import DeltaStack, QuantRows
from kernels.triton.codes import decode_stream
from kernels.triton.lowrank import add_low_rank
from kernels.triton.segments import row_offsets
from kernels.triton.signs import add_signs, decode_signs
from kernels.triton.sparse import add_sparse, decode_sparse


def delta_linear(
    x: Tensor, w_base: Tensor, deltas: DeltaStack, rows: Sequence[int], bias: Tensor | None
) -> Tensor:
    y = F.linear(x, w_base, None if bias is None else bias.to(x.dtype)).contiguous()
    offsets = row_offsets(rows, x.device)
    if deltas.low_rank is not None:
        add_low_rank(x, y, offsets, rows, deltas.low_rank)
    if deltas.signs is not None:
        add_signs(x, y, offsets, rows, deltas.signs)
    for sparse in deltas.sparse.values():
        add_sparse(x, y, offsets, rows, sparse)
    starts = [sum(rows[:s]) for s in range(len(rows))]
    for segment, dense in deltas.dense.items():
        part = slice(starts[segment], starts[segment] + rows[segment])
        y[part] = (y[part].float() + x[part].float() @ dense.float().T).to(y.dtype)
    return y


def _dequantize_rows(q: QuantRows, bucket: int, cols: int) -> Tensor:
    """Bucket ``bucket``'s (rows, cols) matrix, fp32."""
    rows, at = int(q.rows[bucket]), int(q.param_offset[bucket])
    group = int(q.group_size[bucket])
    n_groups = -(-cols // group)
    grid = (q.scale[at : at + rows * n_groups], q.zero[at : at + rows * n_groups], group, 0.0, True)
    out = torch.empty(rows, cols, dtype=torch.float32, device=q.codes.device)
    stream = q.codes[int(q.code_offset[bucket]) :]
    return decode_stream(stream, q.widths[bucket], out, cols, grid)


def decode(deltas: DeltaStack, dtype: torch.dtype) -> Tensor:
    """ΔŴ of a one-delta stack."""
    if 0 in deltas.dense:
        return deltas.dense[0].to(dtype)
    if deltas.signs is not None:
        return decode_signs(deltas.signs, 0, deltas.shape, dtype)
    if deltas.sparse:
        (sparse,) = deltas.sparse.values()
        return decode_sparse(sparse, 0, deltas.shape, dtype)
    d_out, d_in = deltas.shape
    out = torch.zeros(deltas.shape, dtype=torch.float32, device=deltas.device)
    low_rank = deltas.low_rank
    assert low_rank is not None, "a one-delta stack holds exactly one format"
    start = 0
    for bucket in range(low_rank.bucket_segment.numel()):
        v_hat = _dequantize_rows(low_rank.v, bucket, d_in)
        u_hat_t = _dequantize_rows(low_rank.u, bucket, d_out)
        stop = start + v_hat.shape[0]
        out += (u_hat_t.T * low_rank.sigma[start:stop]) @ v_hat
        start = stop
    return out.to(dtype)
