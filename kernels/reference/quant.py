"""Group-wise min-max quantization with fp16 scales and zero points.

A matrix ``w`` of shape (rows, cols) is cut into groups of ``group_size`` consecutive columns
(the input dimension of a linear layer); the last group may be shorter. Each (row, group) has
one scale ``s`` and, when asymmetric, one fp16 zero point ``z`` (in code units); codes are
``q = clamp(round(w / s + z), 0, 2**bits - 1)`` and ``w ≈ (q - z) * s``.

- Asymmetric: ``s = (max - min) / (2**bits - 1)``, ``z = -min / s`` (a float zero: the grid
  spans exactly [min, max], which matters at 1-2 bits where an integer zero wastes levels).
- Symmetric: no stored zero; ``z = (2**bits - 1) / 2`` and ``s = 2 max|w| / (2**bits - 1)``,
  a mid-rise grid of levels ±s/2, ±3s/2, … (at 1 bit: ±max|w|).

Scales are fp16 unless one of the matrix's scales falls outside fp16's normal range
[2**-14, 65504]; then all of them are bfloat16 (8 exponent bits). A delta of a lightly
fine-tuned layer (|Δ| ~ 1e-6) would otherwise get subnormal fp16 scales, whose coarse steps
distort the grid by tens of percent; bfloat16 keeps every scale within 0.4%. Scales and zeros
are rounded to their stored type *before* the codes are computed, so the stored values are
exactly the ones the codes were made with. All arithmetic is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0**-14
SCALE_DTYPES = (torch.float16, torch.bfloat16)

CLIP_GRID = tuple(1.0 - 0.05 * i for i in range(19))
"""Shrink factors tried by the clipping search (1.0 down to 0.1), as GPTQ's ``mse`` option."""


@dataclass(frozen=True)
class QuantParams:
    """Per-group quantization parameters of a (rows, cols) matrix.

    scale: (rows, n_groups) float16 or bfloat16.  zero: (rows, n_groups) float16, or None when
    symmetric.
    """

    bits: int
    group_size: int
    scale: Tensor
    zero: Tensor | None

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be 1..8, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {self.group_size}")
        if self.scale.dtype not in SCALE_DTYPES:
            raise ValueError(f"scales are float16 or bfloat16, got {self.scale.dtype}")
        if self.zero is not None and self.zero.shape != self.scale.shape:
            raise ValueError(f"zero {tuple(self.zero.shape)} ≠ scale {tuple(self.scale.shape)}")

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def group(self, index: int) -> tuple[Tensor, Tensor]:
        """fp32 (scale, zero) of group ``index``, each (rows,)."""
        scale = self.scale[:, index].float()
        if self.zero is None:
            return scale, torch.full_like(scale, ((1 << self.bits) - 1) / 2)
        return scale, self.zero[:, index].float()

    def expand(self, cols: int) -> tuple[Tensor, Tensor]:
        """Per-element fp32 (scale, zero), each (rows, cols)."""
        scale = self.scale.float().repeat_interleave(self.group_size, dim=1)[:, :cols]
        if self.zero is None:
            zero = torch.full_like(scale, ((1 << self.bits) - 1) / 2)
        else:
            zero = self.zero.float().repeat_interleave(self.group_size, dim=1)[:, :cols]
        return scale, zero


def n_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def _grouped(w: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) → (rows, n_groups, group_size) padded values and a bool validity mask."""
    rows, cols = w.shape
    pad = n_groups(cols, group_size) * group_size - cols
    valid = torch.ones(cols, dtype=torch.bool, device=w.device)
    if pad:
        # Repeating the last column leaves the tail group's min and max unchanged.
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
        valid = torch.cat([valid, torch.zeros(pad, dtype=torch.bool, device=w.device)])
    return w.reshape(rows, -1, group_size), valid.reshape(-1, group_size)


def scale_dtype_for(scale: Tensor) -> torch.dtype:
    """float16 if every fp32 scale lies in fp16's normal range, else bfloat16."""
    fits = bool(((scale >= FP16_MIN_NORMAL) & (scale <= FP16_MAX)).all())
    return torch.float16 if fits or scale.numel() == 0 else torch.bfloat16


def stored_scale(scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """fp32 scales → ``dtype`` (None: :func:`scale_dtype_for`), rounded *up*, so the grid
    still spans the group's range: rounding down would shrink it and clamp the extremes."""
    dtype = dtype or scale_dtype_for(scale)
    info = torch.finfo(dtype)
    if bool((scale > info.max).any()):
        raise ValueError(
            f"a group's range needs a scale of {float(scale.max()):.3g}, above the {dtype} "
            f"limit {info.max:.6g}; values this large cannot be stored by this format"
        )
    stored = scale.clamp(min=info.smallest_normal if dtype == torch.bfloat16 else 2.0**-24)
    stored = stored.to(dtype)
    below = stored.float() < scale
    # For positive finite floats, the next representable value is the next bit pattern.
    return (stored.view(torch.int16) + below.to(torch.int16)).view(dtype)


def _params_for_range(
    lo: Tensor, hi: Tensor, bits: int, symmetric: bool, dtype: torch.dtype | None
) -> tuple[Tensor, Tensor | None]:
    levels = (1 << bits) - 1
    if symmetric:
        return stored_scale(2 * torch.maximum(lo.abs(), hi.abs()) / levels, dtype), None
    # A constant group gets scale |min| so that its value stays exactly representable.
    span = torch.where(hi > lo, hi - lo, lo.abs())
    scale = stored_scale(span / levels, dtype)
    return scale, (-lo / scale.float()).half()


def choose_qparams(
    w: Tensor,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    clip_search: bool = False,
    scale_dtype: torch.dtype | None = None,
) -> QuantParams:
    """Min-max parameters for (rows, cols) fp32 ``w``: (rows, n_groups) scales of
    ``scale_dtype`` (None: fp16 or, where fp16 cannot hold them, bf16) and fp16 zeros.

    With ``clip_search`` each group's range is shrunk about its midpoint by the factor in
    :data:`CLIP_GRID` that minimises that group's squared error (GPTQ's ``mse`` option); at
    1-2 bits the plain min-max grid puts its levels on the outliers.
    """
    grouped, valid = _grouped(w.float(), group_size)
    lo, hi = grouped.amin(dim=2), grouped.amax(dim=2)
    scale, zero = _params_for_range(lo, hi, bits, symmetric, scale_dtype)
    best = QuantParams(bits, group_size, scale, zero)
    if not clip_search:
        return best
    best_err = _group_sq_error(grouped, valid, best)
    # Shrink toward the midpoint (asymmetric) or toward zero (symmetric).
    mid = torch.zeros_like(lo) if symmetric else (hi + lo) / 2
    for shrink in CLIP_GRID[1:]:
        lo_c, hi_c = mid + shrink * (lo - mid), mid + shrink * (hi - mid)
        scale_c, zero_c = _params_for_range(lo_c, hi_c, bits, symmetric, scale.dtype)
        cand = QuantParams(bits, group_size, scale_c, zero_c)
        err = _group_sq_error(grouped, valid, cand)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        scale = torch.where(better, scale_c, scale)
        if zero is not None and zero_c is not None:
            zero = torch.where(better, zero_c, zero)
        best = QuantParams(bits, group_size, scale, zero)
    return best


def _group_sq_error(grouped: Tensor, valid: Tensor, params: QuantParams) -> Tensor:
    """(rows, n_groups) squared error of quantizing padded (rows, n_groups, group_size) values
    with ``params``: the same arithmetic as :func:`quantize` then :func:`dequantize`, done on
    the grouped view so the clipping search never expands scales to full size."""
    scale = params.scale.float().unsqueeze(2)
    if params.zero is None:
        zero = torch.full_like(scale, ((1 << params.bits) - 1) / 2)
    else:
        zero = params.zero.float().unsqueeze(2)
    codes = torch.clamp(torch.round(grouped / scale + zero), 0, (1 << params.bits) - 1)
    return (((codes - zero) * scale - grouped).square() * valid).sum(dim=2)


def quantize_values(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Elementwise codes for fp32 ``w`` with broadcastable fp32 ``scale``/``zero`` → uint8."""
    return torch.clamp(torch.round(w / scale + zero), 0, (1 << bits) - 1).to(torch.uint8)


def dequantize_values(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Elementwise fp32 values of uint8 codes ``q``."""
    return (q.float() - zero) * scale


def quantize(w: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) fp32 → (rows, cols) uint8 codes in ``[0, 2**bits)``."""
    scale, zero = params.expand(w.shape[1])
    return quantize_values(w.float(), scale, zero, params.bits)


def dequantize(codes: Tensor, params: QuantParams) -> Tensor:
    """(rows, cols) uint8 codes → (rows, cols) fp32."""
    scale, zero = params.expand(codes.shape[1])
    return dequantize_values(codes, scale, zero)
