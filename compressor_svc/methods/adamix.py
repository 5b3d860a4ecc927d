"""``adamix``: SVD + per-pair bit widths chosen by an exact 0/1 program (arXiv 2506.11087).

1. SVD ΔW = U Σ Vᵀ (all r = min(d_out, d_in) pairs are candidates; the paper truncates only
   to save time).
2. Error table, one GPTQ pass over Vᵀ per width (rows are independent under a fixed H):
   e[i, b] = sigma_i² δv_iᵀ H δv_i with δv_i = v_i - Q_b(v_i) from the *final* quantizer
   (SCIENCE.md pitfall 4), and e[i, 0] = sigma_i² v_iᵀ H v_i for a dropped pair. H is the Gram
   matrix, or the identity without one (then the objective is the weight error).
   Beyond the paper (``count_u_error``, on by default): each kept pair's entry also carries
   an estimate of U's quantization error at that width (``svd.u_errors``). The paper's
   V-only table cannot see that a pair kept at 2 bits costs U error too, so it keeps too
   many pairs at low widths; on the MiniLM pair this term takes ADAMIX from 6% to 29% below
   Delta-CoMe's activation error at 16x, and from worse to 21-23% better at 32x and 64x.
3. Widths by ``allocate_bits`` (exact multiple-choice knapsack) under the exact budget, with
   costs from ``svd.pair_cost`` (codes, scales/zeros, sigma), so the exact ratio meets the target.
   ``max_distinct_widths`` counts the 0 width too: the default 4 admits Delta-CoMe's 8/3/2+0.
4. V̂ from the table's GPTQ runs; U moved to its least-squares target U* (RTC) and quantized
   by GPTQ with H_U = Σ V̂ᵀ H V̂ Σ (``svd.encode_factors``).

:func:`compress_model` pools every matrix's table under one budget: our step beyond the
paper, which allocates per matrix. Errors are summed in absolute output units, so a matrix
whose outputs are larger gets more bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from typing_extensions import override

from compressor_svc.methods.base import (
    RATIO_TOLERANCE,
    Method,
    MethodConfig,
    Target,
    bit_budget,
    check_ratio,
    get_method,
    make_target,
    register_method,
)
from compressor_svc.methods.bit_allocation import allocate_bits
from compressor_svc.methods.quantizer import GPTQConfig, QuantizedMatrix
from compressor_svc.methods.svd import (
    Factors,
    code_bits,
    encode_factors,
    pair_cost,
    quantize_v,
    svd,
    u_errors,
    v_errors,
)
from kernels.reference import EncodedTensor


@dataclass(frozen=True)
class AdamixConfig(MethodConfig):
    widths: tuple[int, ...] = (0, 2, 3, 4, 8)
    max_distinct_widths: int | None = 4
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    correct_u: bool = True
    count_u_error: bool = True
    """Add U's estimated error to the allocation table (False: the paper's V-only table)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(sorted(self.widths)))
        if any(not 0 <= b <= 8 for b in self.widths) or len(set(self.widths)) != len(self.widths):
            raise ValueError(
                f"widths must be distinct values in 0..8 (0 = drop), got {self.widths}"
            )
        if not any(self.widths):
            raise ValueError(f"widths need at least one non-zero width, got {self.widths}")
        if self.max_distinct_widths is not None and self.max_distinct_widths < 1:
            raise ValueError(
                f"max_distinct_widths must be ≥ 1 or None, got {self.max_distinct_widths}"
            )
        self.gptq  # noqa: B018  (GPTQConfig checks group_size and damp now, not mid-stream)

    @property
    def gptq(self) -> GPTQConfig:
        return GPTQConfig(self.group_size, self.act_order, self.damp)


@dataclass(frozen=True)
class ErrorTable:
    """One matrix's allocation problem. errors: (r, n_widths) float64; costs: (r, n_widths)
    int64; v_quantized: GPTQ of all r rows of Vᵀ per non-zero width."""

    factors: Factors
    errors: np.ndarray[Any, np.dtype[np.float64]]
    costs: np.ndarray[Any, np.dtype[np.int64]]
    v_quantized: dict[int, QuantizedMatrix]


def error_table(target: Target, config: AdamixConfig) -> ErrorTable:
    """SVD of the delta and the e[i, b] / cost[i, b] table over ``config.widths``."""
    factors = svd(target.delta)
    v_quantized = {b: quantize_v(factors, target.gram, b, config.gptq) for b in config.widths if b}
    zero = torch.zeros_like(factors.v.T)
    columns = [
        v_errors(factors, v_quantized[b].dequantized if b else zero, target.gram)
        for b in config.widths
    ]
    if config.count_u_error:
        columns = [
            column
            + u_errors(factors, v_quantized[b].dequantized, target.gram, b, config.group_size)
            if b
            else column
            for b, column in zip(config.widths, columns, strict=True)
        ]
    errors = torch.stack(columns, dim=1).double().numpy()
    costs = np.array(
        [[pair_cost(b, target.shape, config.group_size) for b in config.widths]] * len(factors.s),
        dtype=np.int64,
    )
    return ErrorTable(factors, errors, costs, v_quantized)


def encode_choice(
    target: Target,
    table: ErrorTable,
    choice: np.ndarray[Any, np.dtype[np.int64]],
    config: AdamixConfig,
) -> EncodedTensor:
    widths = [config.widths[int(j)] for j in choice]
    return encode_factors(
        target,
        table.factors,
        widths,
        table.v_quantized,
        config=config.gptq,
        correct_u=config.correct_u,
        method=(Adamix.name, Adamix.version),
    )


def _check_reachable(target: Target, config: AdamixConfig) -> None:
    numel = target.shape[0] * target.shape[1]
    rank = min(target.shape)
    nonzero = [b for b in config.widths if b]
    cheapest = pair_cost(min(nonzero), target.shape, config.group_size)
    most = rank * pair_cost(max(nonzero), target.shape, config.group_size)
    if cheapest > target.budget:
        raise ValueError(
            f"adamix cannot exceed {16 * numel / cheapest:.1f}x for {target.shape}: one "
            f"{min(nonzero)}-bit pair costs {cheapest} bits"
        )
    if 16 * numel / most > RATIO_TOLERANCE * target.ratio:
        raise ValueError(
            f"adamix stores at most {most} bits for {target.shape} (all {rank} pairs at "
            f"{max(nonzero)} bits): ratios below "
            f"{16 * numel / most / RATIO_TOLERANCE:.2f}x are unreachable"
        )


def allocate(
    target: Target, config: AdamixConfig
) -> tuple[ErrorTable, np.ndarray[Any, np.dtype[np.int64]]]:
    """``target``'s error table and, per singular-vector pair, the index into
    ``config.widths`` of the width the exact program gives it under ``target.budget``."""
    _check_reachable(target, config)
    table = error_table(target, config)
    choice = allocate_bits(
        table.errors, table.costs, target.budget, max_distinct_widths=config.max_distinct_widths
    )
    return table, choice


def compress_with_widths(
    delta: Tensor, ratio: float, gram: Tensor | None = None, **options: Any
) -> tuple[EncodedTensor, list[int]]:
    """``compress(delta, "adamix", ratio=ratio, gram=gram, **options)`` and the bits it gave
    each singular-vector pair, in SVD order (largest singular value first; 0: dropped)."""
    method = get_method(Adamix.name)
    config: AdamixConfig = method.make_config(options)
    check_ratio(method, ratio)
    target = make_target(delta, ratio, gram)
    table, choice = allocate(target, config)
    widths = [config.widths[int(j)] for j in choice]
    return encode_choice(target, table, choice, config), widths


@register_method
class Adamix(Method[AdamixConfig]):
    name = "adamix"
    config_type = AdamixConfig
    uses_gram = True

    @override
    def encode(self, target: Target, config: AdamixConfig) -> EncodedTensor:
        table, choice = allocate(target, config)
        return encode_choice(target, table, choice, config)

    @override
    def paper_bits(self, encoded: EncodedTensor) -> int:
        return code_bits(encoded)


def compress_model(
    deltas: dict[str, Tensor],
    ratio: float,
    grams: dict[str, Tensor] | None = None,
    **options: Any,
) -> dict[str, EncodedTensor]:
    """ADAMIX over many matrices with one bit budget: floor(16 · Σ numel / ``ratio``).

    ``deltas`` maps names to 2-D deltas; ``grams`` optionally maps the same names to their
    (d_in, d_in) Gram matrices. Each matrix gets its own ratio; together they meet ``ratio``.
    ``max_distinct_widths`` then bounds the widths used across the whole model.
    """
    method = get_method(Adamix.name)
    config: AdamixConfig = method.make_config(options)
    if not deltas:
        raise ValueError("need at least one delta")
    check_ratio(method, ratio)
    tables: dict[str, tuple[Target, ErrorTable]] = {}
    for name, delta in deltas.items():
        target = make_target(delta, ratio, None if grams is None else grams.get(name))
        tables[name] = (target, error_table(target, config))
    budget = bit_budget((sum(d.numel() for d in deltas.values()),), ratio)
    choice = allocate_bits(
        np.concatenate([t.errors for _, t in tables.values()]),
        np.concatenate([t.costs for _, t in tables.values()]),
        budget,
        max_distinct_widths=config.max_distinct_widths,
    )
    out, start = {}, 0
    for name, (target, table) in tables.items():
        stop = start + table.errors.shape[0]
        out[name] = encode_choice(target, table, choice[start:stop], config)
        start = stop
    return out
