"""GPTQ (arXiv 2210.17323): quantize a weight matrix column by column, feeding each column's
error forward through the inverse Hessian so later columns compensate.

The algorithm lives here; the number format (min-max codes with fp16 scale/zero, grouped
along a row) is ``kernels.reference.quant``. Conventions follow Delta-CoMe's GPTQ settings:
asymmetric, groups of 128, act-order, damping 0.01·mean(diag H) (SCIENCE.md pitfall 7).

Two groupings share one sweep:

- :func:`gptq_rows`: the usual layout, one scale/zero per (row, group of 128 columns). With
  act-order, group parameters are fixed up front from the unquantized matrix ("static
  groups"), so the format needs no per-column group index.
- :func:`gptq_columns`: one scale/zero per (column, group of 128 rows), chosen when the sweep
  reaches that column, with a width per column. Used for the U factor of an SVD, whose
  columns are singular vectors of different bit widths.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import dequantize, quantize
from kernels.reference import (
    QuantParams,
    choose_qparams,
    dequantize_values,
    quantize_values,
)

ColumnQuantizer = Callable[[int, Tensor], Tensor]
"""(sweep position j, current column (rows,)) → dequantized column (rows,)."""

FACTOR_SCALES = torch.float16
"""Scales of quantized factors are always fp16: singular-vector entries are O(1/√d), well
inside fp16's normal range, and one fixed type keeps GPTQ's per-group fitting uniform."""


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.block_size < 1:
            raise ValueError(f"group_size and block_size must be ≥ 1, got {self}")
        if not 0 <= self.damp < 1:
            raise ValueError(
                f"damp is a fraction of mean(diag H): use 0 ≤ damp < 1, got {self.damp}"
            )


@dataclass(frozen=True)
class QuantizedMatrix:
    """codes: (rows, cols) uint8 in the input's column order; params: grouped along rows of
    the stored layout; dequantized: (rows, cols) fp32 of the input's layout."""

    codes: Tensor
    params: QuantParams
    dequantized: Tensor


def damped_hessian(gram: Tensor | None, size: int, damp: float) -> Tensor:
    """(size, size) fp32 H + damp·mean(diag H)·I; the identity when there is no gram
    (GPTQ then reduces to round-to-nearest). Dead inputs (zero diagonal) get 1."""
    if gram is None:
        return torch.eye(size)
    h = gram.float().clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    mean_diag = float(torch.diagonal(h).mean())
    h += torch.eye(size) * damp * mean_diag
    return h


def _upper_inverse_cholesky(h: Tensor) -> Tensor:
    """Upper Cholesky factor of H⁻¹, computed in fp64: for d_in in the thousands, fp32
    Cholesky of a nearly singular Gram matrix loses the small pivots GPTQ divides by."""
    h64 = h.double()
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h64))
    factor: Tensor = torch.linalg.cholesky(inverse, upper=True)
    return factor.float()


def _sweep(
    w: Tensor,
    hinv: Tensor,
    block_size: int,
    quantize_column: ColumnQuantizer,
    on_block: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """GPTQ's blocked sweep over the columns of (rows, cols) ``w`` (already permuted).

    ``on_block(start, block)`` sees each block of current weights before it is quantized.
    Returns the (rows, cols) dequantized matrix in the same (permuted) order.
    """
    w = w.clone()
    out = torch.empty_like(w)
    cols = w.shape[1]
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        block, block_hinv = w[:, start:stop], hinv[start:stop, start:stop]
        if on_block is not None:
            on_block(start, block)
        errors = torch.empty_like(block)
        for i in range(stop - start):
            column = block[:, i]
            out[:, start + i] = quantize_column(start + i, column)
            err = (column - out[:, start + i]) / block_hinv[i, i]
            block[:, i + 1 :] -= err.unsqueeze(1) * block_hinv[i, i + 1 :].unsqueeze(0)
            errors[:, i] = err
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    return out


def _order(h: Tensor, act_order: bool) -> Tensor:
    if act_order:
        return torch.argsort(torch.diagonal(h), descending=True, stable=True)
    return torch.arange(h.shape[0])


def gptq_rows(
    w: Tensor, gram: Tensor | None, bits: int, config: GPTQConfig, *, symmetric: bool = False
) -> QuantizedMatrix:
    """Quantize (rows, cols) fp32 ``w`` for the layer input Gram (cols, cols) ``gram``.

    Groups run along each row (``config.group_size`` columns share a scale/zero); rows are
    independent, so quantizing a subset of rows gives the same rows as quantizing them all.
    """
    rows, cols = w.shape
    h = damped_hessian(gram, cols, config.damp)
    perm = _order(h, config.act_order)
    hinv = _upper_inverse_cholesky(h[perm][:, perm])
    group = config.group_size
    n_group = -(-cols // group)
    scale = torch.empty(rows, n_group, dtype=torch.float16)
    zero = None if symmetric else torch.empty(rows, n_group, dtype=torch.float16)
    if config.act_order:
        static = choose_qparams(w, bits, group, symmetric=symmetric, scale_dtype=FACTOR_SCALES)
        scale, zero = static.scale, static.zero
    block_size = config.block_size if config.act_order else group

    def on_block(start: int, block: Tensor) -> None:
        # Without act-order, blocks coincide with groups: fit the group on current weights.
        fitted = choose_qparams(block, bits, group, symmetric=symmetric, scale_dtype=FACTOR_SCALES)
        scale[:, start // group] = fitted.scale[:, 0]
        if zero is not None and fitted.zero is not None:
            zero[:, start // group] = fitted.zero[:, 0]

    params = QuantParams(bits, group, scale, zero)
    codes = torch.empty(rows, cols, dtype=torch.uint8)

    def quantize_column(j: int, column: Tensor) -> Tensor:
        original = int(perm[j])
        s, z = params.group(original // group)
        q = quantize_values(column, s, z, bits)
        codes[:, original] = q
        return dequantize_values(q, s, z)

    _sweep(w[:, perm], hinv, block_size, quantize_column, None if config.act_order else on_block)
    return QuantizedMatrix(codes, params, dequantize(codes, params))


@dataclass(frozen=True)
class ColumnQuantized:
    """Per-column results of :func:`gptq_columns`, in the input's column order.

    codes_t: (cols, rows) uint8, i.e. codes of wᵀ; params[j] groups column j along rows
    ((1, n_groups) fp16); dequantized: (rows, cols) fp32.
    """

    codes_t: Tensor
    params: list[QuantParams]
    dequantized: Tensor


def gptq_columns(
    w: Tensor, hessian: Tensor, bits: Sequence[int], config: GPTQConfig
) -> ColumnQuantized:
    """Quantize (rows, cols) ``w`` with (cols, cols) ``hessian``; column j at ``bits[j]``
    bits, its scale/zero per ``config.group_size`` rows fitted when the sweep reaches it."""
    rows, cols = w.shape
    if len(bits) != cols:
        raise ValueError(f"need one width per column: {cols} columns, {len(bits)} widths")
    h = damped_hessian(hessian, cols, config.damp)
    perm = _order(h, config.act_order)
    hinv = _upper_inverse_cholesky(h[perm][:, perm])
    codes_t = torch.empty(cols, rows, dtype=torch.uint8)
    params: list[QuantParams | None] = [None] * cols

    def quantize_column(j: int, column: Tensor) -> Tensor:
        original = int(perm[j])
        row_vector = column.unsqueeze(0)
        fitted = choose_qparams(
            row_vector, bits[original], config.group_size, scale_dtype=FACTOR_SCALES
        )
        params[original] = fitted
        codes_t[original] = quantize(row_vector, fitted)[0]
        return dequantize(codes_t[original].unsqueeze(0), fitted)[0]

    dequantized = torch.empty_like(w)
    dequantized[:, perm] = _sweep(w[:, perm], hinv, config.block_size, quantize_column)
    done = [p for p in params if p is not None]
    return ColumnQuantized(codes_t, done, dequantized)
