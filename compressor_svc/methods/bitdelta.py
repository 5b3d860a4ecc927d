"""``bitdelta``: Δ̂ = alpha ⊙ sign(Δ), and its residual extension for lower ratios.

Level 1 is BitDelta-Initial (arXiv 2402.10193): signs with zero mapped to -1, as the
reference does, and alpha = mean|Δ| per matrix (the paper) or per row. When a calibration Gram
matrix G is given, alpha is refitted in closed form for activation error with the signs fixed:
alpha = ⟨R, S G⟩ / ⟨S, S G⟩ (per row: the same sums over each row). Level l repeats this on the
residual R_{l-1} = Δ - Σ_{m<l} alpha_m S_m (the paper's residual extension), so ``levels`` sign
planes give about 16/levels x. Scales are stored fp32, as BitDelta stores alpha.

Ratios: one level costs numel + 32·(1 or d_out) bits, so the format reaches only bands just
below 16/levels x; a target between bands raises ValueError naming the nearest ones. Scale
distillation (the paper's model-level logit fit) is not a per-matrix step and is not here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor
from typing_extensions import override

from compressor_svc.methods.base import (
    RATIO_TOLERANCE,
    Method,
    MethodConfig,
    Target,
    register_method,
)
from kernels import code_part
from kernels.reference import EncodedTensor, Part, PartDtype

SCALE_BITS = 32


class ScaleGranularity(enum.StrEnum):
    """Which elements share one alpha."""

    MATRIX = "matrix"
    """One alpha per matrix and level (the paper)."""
    ROW = "row"
    """One alpha per output row and level."""


@dataclass(frozen=True)
class BitDeltaConfig(MethodConfig):
    scale: ScaleGranularity = ScaleGranularity.MATRIX
    max_levels: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", ScaleGranularity(self.scale))
        if not 1 <= self.max_levels <= 16:
            raise ValueError(
                f"max_levels must be 1..16 sign planes, got {self.max_levels}; "
                "below 16/16 = 1x use the lossless method"
            )


def _level_ratio(shape: tuple[int, int], levels: int, n_scales: int) -> float:
    numel = shape[0] * shape[1]
    return 16 * numel / (levels * (numel + SCALE_BITS * n_scales))


def choose_levels(target: Target, config: BitDeltaConfig) -> int:
    """Sign planes for the target ratio; ValueError naming the reachable bands otherwise."""
    d_out, d_in = target.shape
    n_scales = d_out if config.scale is ScaleGranularity.ROW else 1
    per_level = d_out * d_in + SCALE_BITS * n_scales
    levels = target.budget // per_level
    reachable = ", ".join(
        f"{_level_ratio(target.shape, k, n_scales) / RATIO_TOLERANCE:.2f}-"
        f"{_level_ratio(target.shape, k, n_scales):.2f}x"
        for k in range(1, min(config.max_levels, 4) + 1)
    )
    if levels < 1:
        raise ValueError(
            f"bitdelta cannot exceed {_level_ratio(target.shape, 1, n_scales):.2f}x for "
            f"{target.shape} (1 bit per weight + {n_scales} fp32 scale(s)); got {target.ratio}x"
        )
    if levels > config.max_levels:
        raise ValueError(
            f"bitdelta with max_levels={config.max_levels} reaches down to "
            f"{_level_ratio(target.shape, config.max_levels, n_scales):.2f}x; got "
            f"{target.ratio}x (raise max_levels or use a quantizing method)"
        )
    if _level_ratio(target.shape, levels, n_scales) > RATIO_TOLERANCE * target.ratio:
        raise ValueError(
            f"bitdelta reaches only bands just below 16/levels x ({reachable}, …); "
            f"{target.ratio}x falls between bands"
        )
    return int(levels)


def fit_scale(residual: Tensor, signs: Tensor, gram: Tensor | None, per_row: bool) -> Tensor:
    """alpha for fixed ±1 ``signs``: (d_out,) per row or (1,) per matrix, fp32.

    Without ``gram``, mean|residual| (L2-optimal in weight space for fixed signs); with it,
    the minimiser of ‖(residual - alpha·signs) X‖² in closed form.
    """
    dims = (1,) if per_row else (0, 1)
    mean_abs = residual.abs().mean(dim=dims).reshape(-1)
    if gram is None:
        return mean_abs
    signs_g = signs @ gram
    num = (residual * signs_g).sum(dim=dims).reshape(-1)
    den = (signs * signs_g).sum(dim=dims).reshape(-1)
    # A sign pattern in G's null space carries no activation: keep the weight-space alpha.
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), mean_abs)


@register_method
class BitDelta(Method[BitDeltaConfig]):
    name = "bitdelta"
    config_type = BitDeltaConfig
    uses_gram = True

    @override
    def encode(self, target: Target, config: BitDeltaConfig) -> EncodedTensor:
        levels = choose_levels(target, config)
        per_row = config.scale is ScaleGranularity.ROW
        residual = target.delta.clone()
        planes, scales = [], []
        for _ in range(levels):
            positive = residual > 0  # zero counts as -1, as in the reference
            signs = torch.where(positive, 1.0, -1.0)
            alpha = fit_scale(residual, signs, target.gram, per_row)
            # In place: alpha·(±1) is exact, so this rounds as residual - alpha·signs does.
            residual.addcmul_(signs, alpha.unsqueeze(1), value=-1)
            del signs
            planes.append(positive)
            scales.append(alpha)
        parts = (
            code_part("signs", torch.stack(planes).to(torch.uint8), 1),
            Part.from_floats("scales", torch.stack(scales), PartDtype.FLOAT32),
        )
        params = {"scale": config.scale.value}
        return EncodedTensor(self.name, self.version, target.shape, target.dtype, params, parts)

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        # BitDelta counts its signs and its scales: everything (SCIENCE.md §0).
        return encoded.nbits
