"""``deltacome``: SVD + mixed precision by singular-value rank (arXiv 2406.08903).

Pairs are taken in rank order (largest sigma first) and filled into fixed buckets: the first
``counts[0]`` at ``widths[0]`` bits, the next ``counts[1]`` at ``widths[1]``, and the rest at
the last width, as long as the exact budget allows; the remaining pairs get 0 bits. Defaults
8/3/2 with 2 and 32 pairs are Delta-CoMe's ``run.sh`` split for 4096-wide layers at alpha=1/16.
On a small matrix the greedy fill stops early in a bucket and moves on to the cheaper one,
which keeps every delta within budget. Factors are quantized by GPTQ, V then U (no U
correction: that is ADAMIX's addition). Same format and exact costs as ``adamix``, so the
two are compared at equal exact bits.
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
from compressor_svc.methods.quantizer import GPTQConfig
from compressor_svc.methods.svd import code_bits, encode_factors, pair_cost, quantize_v, svd
from kernels.reference import EncodedTensor


@dataclass(frozen=True)
class DeltaCoMeConfig(MethodConfig):
    widths: tuple[int, ...] = (8, 3, 2)
    counts: tuple[int, ...] = (2, 32)
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(self.widths))
        object.__setattr__(self, "counts", tuple(self.counts))
        if not self.widths or any(not 1 <= b <= 8 for b in self.widths):
            raise ValueError(f"widths must be 1..8-bit bucket widths, got {self.widths}")
        if len(set(self.widths)) != len(self.widths):
            raise ValueError(f"bucket widths must be distinct, got {self.widths}")
        if len(self.counts) != len(self.widths) - 1 or any(n < 0 for n in self.counts):
            raise ValueError(
                f"counts gives the size of every bucket but the last: need "
                f"{len(self.widths) - 1} non-negative counts for widths {self.widths}, "
                f"got {self.counts}"
            )
        self.gptq  # noqa: B018  (GPTQConfig checks group_size and damp now, not mid-stream)

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(self.group_size, self.act_order, self.damp)


def rank_buckets(target: Target, rank: int, config: DeltaCoMeConfig) -> list[int]:
    """(rank,) widths in rank order: Delta-CoMe's buckets, filled greedily within budget."""
    widths = [0] * rank
    spent, i = 0, 0
    for b, n in zip(config.widths, (*config.counts, rank), strict=True):
        cost = pair_cost(b, target.shape, config.group_size)
        take = min(n, rank - i, (target.budget - spent) // cost)
        widths[i : i + take] = [b] * take
        spent, i = spent + take * cost, i + take
    return widths


@register_method
class DeltaCoMe(Method[DeltaCoMeConfig]):
    name = "deltacome"
    config_type = DeltaCoMeConfig
    uses_gram = True

    @override
    def encode(self, target: Target, config: DeltaCoMeConfig) -> EncodedTensor:
        numel = target.shape[0] * target.shape[1]
        rank = min(target.shape)
        smallest = pair_cost(min(config.widths), target.shape, config.group_size)
        if smallest > target.budget:
            raise ValueError(
                f"deltacome cannot exceed {16 * numel / smallest:.1f}x for {target.shape}: one "
                f"{min(config.widths)}-bit pair costs {smallest} bits"
            )
        widths = rank_buckets(target, rank, config)
        spent = sum(pair_cost(b, target.shape, config.group_size) for b in widths)
        if 16 * numel / spent > RATIO_TOLERANCE * target.ratio:
            raise ValueError(
                f"deltacome's {'/'.join(map(str, config.widths))} split of all {rank} pairs stores "
                f"at most {spent} bits for {target.shape}: ratios below "
                f"{16 * numel / spent / RATIO_TOLERANCE:.2f}x are unreachable"
            )
        factors = svd(target.delta)
        v_quantized = {
            b: quantize_v(factors, target.gram, b, config.gptq) for b in set(widths) if b > 0
        }
        return encode_factors(
            target,
            factors,
            widths,
            v_quantized,
            config=config.gptq,
            correct_u=False,
            method=(self.name, self.version),
        )

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        return code_bits(encoded)
