"""Closed forms and the orderings the papers predict, on synthetic deltas (SCIENCE.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor

from compressor_svc.methods import (
    bit_budget,
    compress,
    relative_activation_error,
    relative_weight_error,
)
from compressor_svc.methods.adamix import (
    AdamixConfig,
    compress_model,
    compress_with_widths,
    error_table,
)
from compressor_svc.methods.base import Target
from compressor_svc.methods.bit_allocation import allocate_bits
from compressor_svc.methods.deltacome import DeltaCoMeConfig, rank_buckets
from kernels.reference import decode, group_mask, threshold_for_count, threshold_mask
from tests.unit.methods.conftest import low_rank_plus_noise


def test_bitdelta_initial_matches_gaussian_closed_form() -> None:
    delta = torch.randn(256, 512, generator=torch.Generator().manual_seed(3)) * 1e-3
    err = relative_weight_error(delta, decode(compress(delta, "bitdelta", ratio=15.0)))
    assert math.isclose(err, math.sqrt(1 - 2 / math.pi), abs_tol=0.005)


def test_bitdelta_gram_fit_lowers_activation_error(delta: Tensor, gram: Tensor) -> None:
    blind = relative_activation_error(delta, decode(compress(delta, "bitdelta", ratio=15.0)), gram)
    fitted = decode(compress(delta, "bitdelta", ratio=15.0, gram=gram))
    assert relative_activation_error(delta, fitted, gram) < blind


# Measured on this small synthetic delta: 0.74x of Delta-CoMe at 16x, 0.82x at 32x.
@pytest.mark.parametrize(("ratio", "margin"), [(16.0, 0.8), (32.0, 0.9)])
def test_adamix_beats_deltacome_at_equal_exact_bits(
    delta: Tensor, gram: Tensor, held_out_gram: Tensor, ratio: float, margin: float
) -> None:
    big = delta * 10  # ADAMIX's margin grows with ‖ΔW‖ (SCIENCE.md, orderings)
    come = compress(big, "deltacome", ratio=ratio, gram=gram)
    # The same exact budget: Delta-CoMe's split is then a feasible point of ADAMIX's program.
    mix = compress(big, "adamix", ratio=come.ratio * (1 - 1e-12), gram=gram)
    assert mix.nbits <= come.nbits
    err_come = relative_activation_error(big, decode(come), held_out_gram)
    err_mix = relative_activation_error(big, decode(mix), held_out_gram)
    assert err_mix <= margin * err_come, (err_mix, err_come)


def test_adamix_objective_never_exceeds_deltacome_split(delta: Tensor, gram: Tensor) -> None:
    target = Target(delta, 16.0, gram, "float32")
    config = AdamixConfig(max_distinct_widths=None)
    table = error_table(target, config)
    column = {b: j for j, b in enumerate(config.widths)}
    split = rank_buckets(target, min(delta.shape), DeltaCoMeConfig())
    rows = np.arange(len(split))
    come_choice = np.array([column[b] for b in split])
    assert table.costs[rows, come_choice].sum() <= target.budget
    mix = compress(delta, "adamix", ratio=16.0, gram=gram, max_distinct_widths=None)
    chosen = {int(b) for b in mix.params["widths"].split(",")}
    assert chosen <= set(config.widths)
    best = allocate_bits(table.errors, table.costs, target.budget)
    assert table.errors[rows, best].sum() <= table.errors[rows, come_choice].sum()


def test_triple_precision_beats_single_width(delta: Tensor, gram: Tensor) -> None:
    triple = compress(delta, "deltacome", ratio=16.0, gram=gram)
    single = compress(delta, "deltacome", ratio=16.0, gram=gram, widths=(2,), counts=())
    err_triple = relative_activation_error(delta, decode(triple), gram)
    assert err_triple < relative_activation_error(delta, decode(single), gram)


def test_group_dropout_beats_bernoulli_at_equal_p() -> None:
    """Group-wise dropout removes the in-group mean of the products ΔW_ij x_j from the error
    variance (SCIENCE.md §1), so it wins where those products share a mean: rows with an
    offset and inputs with a non-zero mean. (On zero-mean i.i.d. deltas the two tie, as the
    variance formula predicts.)"""
    rows, cols = 64, 256
    g = torch.Generator().manual_seed(4)
    delta = (torch.randn(rows, 1, generator=g) + 0.3 * torch.randn(rows, cols, generator=g)) * 1e-3
    x = torch.randn(cols, 1024, generator=g) + 1.0
    gram = x @ x.T / x.shape[1]
    group, keep = 16, 4  # p = 0.75
    group_err, bern_err = [], []
    for seed in range(4):
        grouped = delta * group_mask((rows, cols), seed, group, keep) * (group / keep)
        t = threshold_for_count(rows * cols, seed, rows * cols * keep // group)
        mask = threshold_mask((rows, cols), seed, t)
        bernoulli = delta * mask * (rows * cols / int(mask.sum()))
        group_err.append(relative_activation_error(delta, grouped, gram))
        bern_err.append(relative_activation_error(delta, bernoulli, gram))
    # Expected √(1/2) here: the diagonal (weight-error) part of G is the same for both.
    assert sum(group_err) < 0.85 * sum(bern_err), (group_err, bern_err)


def test_deltadq_beats_dare_at_16x_and_reaches_512x(delta: Tensor, gram: Tensor) -> None:
    dq = relative_activation_error(
        delta, decode(compress(delta, "deltadq", ratio=16.0, gram=gram)), gram
    )
    dare = relative_activation_error(delta, decode(compress(delta, "dare", ratio=16.0)), gram)
    assert dq < dare
    wide = torch.randn(256, 2048, generator=torch.Generator().manual_seed(5)) * 1e-3
    encoded = compress(wide, "deltadq", ratio=512.0)
    assert 512.0 <= encoded.ratio <= 1.1 * 512.0


def test_model_wide_budget_is_shared(gram: Tensor) -> None:
    deltas = {
        "a": low_rank_plus_noise(128, 256, 10, scale=0.05),
        "b": low_rank_plus_noise(64, 256, 11),
    }
    out = compress_model(deltas, 16.0, grams={"a": gram, "b": gram})
    total = sum(e.nbits for e in out.values())
    assert total <= bit_budget((128 * 256 + 64 * 256,), 16.0)
    assert 16 * (128 * 256 + 64 * 256) / total <= 1.1 * 16
    assert out["a"].nbits > out["b"].nbits  # the larger-norm matrix draws more bits


def test_adamix_widths_are_what_compress_stores(delta: Tensor, gram: Tensor) -> None:
    encoded, widths = compress_with_widths(delta, 16.0, gram)
    assert encoded.to_bytes() == compress(delta, "adamix", ratio=16.0, gram=gram).to_bytes()
    assert len(widths) == min(delta.shape)
    stored = {
        int(p.name[1:].split(".")[0]): p.shape[0]
        for p in encoded.parts
        if p.name.startswith("v") and p.name.endswith(".codes")
    }
    assert stored == {b: widths.count(b) for b in set(widths) if b}
    assert widths[0] == max(widths)  # the largest singular value is never starved
