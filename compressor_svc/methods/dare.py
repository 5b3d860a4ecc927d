"""``dare``: random drop with 1/(1-p) rescale (arXiv 2311.03099), survivors quantized.

DARE itself defines no storage format (its paper counts only p). As a storage baseline:

- The mask is seeded (``kernels.reference.prng``): keys below a threshold are kept, each
  element independently with probability 1-p as DARE's Bernoulli draw, and it costs **0 index
  bits** (seed and threshold are decode params). The threshold is taken from the keys so the
  kept count is exact: the budget fixes it, not a binomial draw.
- Survivors are rescaled by numel / n_kept (= 1/(1-p) exactly) and then quantized in
  row-major order, in groups of ``group_size`` with fp16 scale + zero and a clipping search,
  the same quantizer DeltaDQ uses, so the comparison isolates the dropout scheme. ``bits=16``
  stores fp16 survivors instead, as DARE's own models do.
- p is not an option: the ratio fixes how many survivors fit the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing_extensions import override

from compressor_svc.methods.base import (
    RATIO_TOLERANCE,
    Method,
    MethodConfig,
    Target,
    register_method,
)
from kernels import quantize, quantized_parts
from kernels.reference import (
    EncodedTensor,
    Part,
    PartDtype,
    choose_qparams,
    n_groups,
    prng_params,
    threshold_for_count,
    threshold_mask,
)

FP16_BITS = 16
GROUP_OVERHEAD_BITS = 32  # 16-bit scale (fp16, or bf16 out of range) + fp16 zero


@dataclass(frozen=True)
class DareConfig(MethodConfig):
    bits: int = 4
    group_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not (1 <= self.bits <= 8 or self.bits == FP16_BITS):
            raise ValueError(f"dare bits must be 1..8 (quantized) or 16 (fp16), got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be ≥ 1, got {self.group_size}")
        if not 0 <= self.seed < 1 << 32:
            raise ValueError(f"seed must fit in 32 unsigned bits, got {self.seed}")


def survivor_bits(n_kept: int, config: DareConfig) -> int:
    """Exact bits of ``n_kept`` stored survivors (positions are free)."""
    if config.bits == FP16_BITS:
        return n_kept * FP16_BITS
    return n_kept * config.bits + n_groups(n_kept, config.group_size) * GROUP_OVERHEAD_BITS


def max_survivors(budget: int, numel: int, config: DareConfig) -> int:
    """Largest kept count whose exact bits fit ``budget`` (binary search, cost is monotone)."""
    lo, hi = 0, numel
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if survivor_bits(mid, config) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


@register_method
class Dare(Method[DareConfig]):
    name = "dare"
    config_type = DareConfig

    @override
    def encode(self, target: Target, config: DareConfig) -> EncodedTensor:
        numel = target.delta.numel()
        n_kept = max_survivors(target.budget, numel, config)
        if n_kept == 0:
            raise ValueError(
                f"dare at bits={config.bits} cannot exceed "
                f"{16 * numel / survivor_bits(1, config):.1f}x here: one survivor costs "
                f"{survivor_bits(1, config)} bits"
            )
        floor_ratio = 16 * numel / survivor_bits(numel, config)
        if floor_ratio > RATIO_TOLERANCE * target.ratio:
            raise ValueError(
                f"dare at bits={config.bits} keeping every element is already "
                f"{floor_ratio:.2f}x; ratios below "
                f"{floor_ratio / RATIO_TOLERANCE:.2f}x need more bits"
            )
        threshold = threshold_for_count(numel, config.seed, n_kept)
        mask = threshold_mask(target.shape, config.seed, threshold)
        kept = int(mask.sum())  # ≤ n_kept: keys tied at the threshold are dropped
        survivors = (target.delta[mask] * (numel / kept)).unsqueeze(0)
        params = {**prng_params(config.seed), "threshold": str(threshold)}
        if config.bits == FP16_BITS:
            parts = [Part.from_floats("values", survivors.view(-1), PartDtype.FLOAT16)]
        else:
            qparams = choose_qparams(survivors, config.bits, config.group_size, clip_search=True)
            parts = quantized_parts("values", quantize(survivors, qparams), qparams)
            params["group_size"] = str(config.group_size)
        return EncodedTensor(
            self.name, self.version, target.shape, target.dtype, params, tuple(parts)
        )

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        # DARE counts p only: value bits of the survivors, positions and scales free.
        values = [p for p in encoded.parts if p.name in ("values", "values.codes")]
        return sum(p.nbits for p in values)
