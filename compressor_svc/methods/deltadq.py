"""``deltadq``: group-wise dropout + low-bit quantization of the survivors (arXiv 2410.08666).

Group-wise dropout: each row is cut into groups of g columns along the input dimension; in
every group exactly k = keep elements survive, chosen uniformly without replacement by a
seeded mask (``kernels.reference.prng.group_mask``), and are rescaled by g/k (the tail group
of t < g columns keeps its share k_t and is rescaled by t/k_t). Against DARE's Bernoulli
draw, each group's error then sums to zero, so only the within-group spread of ΔW_ij x_j
remains (SCIENCE.md §1).

Exact accounting: positions cost 0 bits (a seeded mask; seed and PRNG name in params). Every
row keeps the same count, so survivors form a dense row-major sequence, quantized to ``bits``
with an fp16 scale + zero per ``quant_group_size`` survivors and a clipping search.

The ratio fixes p (SCIENCE.md pitfall 11): for each candidate (bits, g) the largest k that
fits the budget is taken, and candidates that cannot land within 10% of the target are
skipped. Among the rest, the one with the least error wins: activation error under ``gram``
(the paper's calibration criterion, here per matrix), or without it the data-free proxy
G = I + 11ᵀ, i.e. inputs with unit mean and unit variance per channel, which scores both the
weight error and the row-sum error that the "balanced intermediate results" argument is
about (SCIENCE.md §1).

Not implemented: the paper's "separate quantization" into m value-range parts. With part
membership counted (pitfall 12) it saves nothing over plain ``bits``-bit codes.
"""

from __future__ import annotations

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
from kernels.reference import (
    EncodedTensor,
    choose_qparams,
    decode,
    group_keep_counts,
    group_mask,
    n_groups,
    prng_params,
    quantize,
    quantized_parts,
)

GROUP_OVERHEAD_BITS = 32  # fp16 scale + fp16 zero
DEFAULT_BITS = (1, 2, 3, 4)
BASE_QUANT_GROUP = 128


@dataclass(frozen=True)
class DeltaDQConfig(MethodConfig):
    bits: tuple[int, ...] = DEFAULT_BITS
    """Code widths to try; a single width fixes it."""
    dropout_groups: tuple[int, ...] | None = None
    """Group sizes g to try; None: powers of two from 8 up to d_in."""
    quant_group_size: int | None = None
    """Survivors per scale/zero; None: 128 · R/16 rounded up to a power of two (≥ 128), so
    the scale overhead per original weight stays what it is at 16x."""
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", tuple(self.bits))
        if not self.bits or any(not 1 <= b <= 8 for b in self.bits):
            raise ValueError(f"bits must be code widths in 1..8, got {self.bits}")
        if self.dropout_groups is not None:
            object.__setattr__(self, "dropout_groups", tuple(self.dropout_groups))
            if not self.dropout_groups or min(self.dropout_groups) < 1:
                raise ValueError(f"dropout_groups must be sizes ≥ 1, got {self.dropout_groups}")
        if self.quant_group_size is not None and self.quant_group_size < 1:
            raise ValueError(f"quant_group_size must be ≥ 1, got {self.quant_group_size}")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"seed must fit in 32 unsigned bits, got {self.seed}")


@dataclass(frozen=True)
class Layout:
    """One candidate: ``bits``-bit codes, keep ``keep`` of every ``group`` columns."""

    bits: int
    group: int
    keep: int
    quant_group: int


def quant_group_for(ratio: float, config: DeltaDQConfig) -> int:
    if config.quant_group_size is not None:
        return config.quant_group_size
    size = BASE_QUANT_GROUP
    while size < BASE_QUANT_GROUP * ratio / 16:
        size *= 2
    return size


def layout_bits(layout: Layout, shape: tuple[int, int]) -> int:
    """Exact bits of a layout: survivor codes plus their scales and zeros."""
    d_out, d_in = shape
    kept = d_out * sum(group_keep_counts(d_in, layout.group, layout.keep))
    return kept * layout.bits + n_groups(kept, layout.quant_group) * GROUP_OVERHEAD_BITS


def candidate_layouts(target: Target, config: DeltaDQConfig) -> list[Layout]:
    """Every (bits, g) with the largest budget-fitting k landing within 10% of the target."""
    d_in = target.shape[1]
    groups = (
        config.dropout_groups
        or tuple(2**i for i in range(3, d_in.bit_length()) if 2**i <= d_in)
        or (d_in,)
    )
    quant_group = quant_group_for(target.ratio, config)
    numel = target.shape[0] * d_in
    found = []
    for bits in config.bits:
        for group in (g for g in groups if g <= d_in):
            fits = [
                k
                for k in range(1, group + 1)
                if layout_bits(Layout(bits, group, k, quant_group), target.shape) <= target.budget
            ]
            if not fits:
                continue
            layout = Layout(bits, group, max(fits), quant_group)
            if 16 * numel / layout_bits(layout, target.shape) <= RATIO_TOLERANCE * target.ratio:
                found.append(layout)
    if not found:
        low, high = _ratio_limits(target, config, groups, quant_group)
        raise ValueError(
            f"deltadq reaches {low:.2f}-{high:.0f}x for {target.shape} with bits {config.bits} "
            f"and groups {groups}, but no layout lands in [{target.ratio}, "
            f"{RATIO_TOLERANCE * target.ratio:.1f}]x"
        )
    return found


def _ratio_limits(
    target: Target, config: DeltaDQConfig, groups: tuple[int, ...], quant_group: int
) -> tuple[float, float]:
    """(least, most) exact ratio of any layout: keep all at the widest code, or keep one
    per row in the largest group at the narrowest."""
    numel = target.shape[0] * target.shape[1]
    widest = Layout(max(config.bits), min(groups), min(groups), quant_group)
    sparsest = Layout(min(config.bits), max(groups), 1, quant_group)
    return (
        16 * numel / layout_bits(widest, target.shape),
        16 * numel / layout_bits(sparsest, target.shape),
    )


def _column_rescale(d_in: int, layout: Layout) -> Tensor:
    """(d_in,) g/k per column (t/k_t in the tail group)."""
    counts = group_keep_counts(d_in, layout.group, layout.keep)
    widths = [min(layout.group, d_in - i * layout.group) for i in range(len(counts))]
    per_group = torch.tensor([w / k for w, k in zip(widths, counts, strict=True)])
    return per_group.repeat_interleave(torch.tensor(widths))


def encode_layout(
    target: Target, layout: Layout, seed: int, method: tuple[str, int]
) -> EncodedTensor:
    mask = group_mask(target.shape, seed, layout.group, layout.keep)
    scaled = target.delta * _column_rescale(target.shape[1], layout)
    survivors = scaled[mask].unsqueeze(0)
    qparams = choose_qparams(survivors, layout.bits, layout.quant_group, clip_search=True)
    params = {
        **prng_params(seed),
        "dropout_group": str(layout.group),
        "keep": str(layout.keep),
        "group_size": str(layout.quant_group),
    }
    parts = quantized_parts("values", quantize(survivors, qparams), qparams)
    name, version = method
    return EncodedTensor(name, version, target.shape, target.dtype, params, tuple(parts))


def selection_gram(target: Target) -> Tensor:
    """The Gram matrix that scores candidates: the caller's, or the data-free I + 11ᵀ."""
    if target.gram is not None:
        return target.gram
    d_in = target.shape[1]
    return torch.eye(d_in) + torch.ones(d_in, d_in)


@register_method
class DeltaDQ(Method[DeltaDQConfig]):
    name = "deltadq"
    config_type = DeltaDQConfig
    uses_gram = True

    @override
    def encode(self, target: Target, config: DeltaDQConfig) -> EncodedTensor:
        gram = selection_gram(target)
        best: tuple[float, EncodedTensor] | None = None
        for layout in candidate_layouts(target, config):
            encoded = encode_layout(target, layout, config.seed, (self.name, self.version))
            err = target.delta - decode(encoded)
            score = float(((err @ gram) * err).sum())
            if best is None or score < best[0]:
                best = (score, encoded)
        assert best is not None  # candidate_layouts raises when it finds nothing
        return best[1]

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        # Value bits only: positions and scales are free in the paper's count (SCIENCE.md §0).
        return encoded.part("values.codes").nbits
