"""Bit-allocation speed on a synthetic Llama-2-7B-shaped error table (issue 3, "Allocation speed").

``python -m tests.bench.bench_allocation [--seed 0] [--milp-matrices 3]``

Builds, per decoder layer (x32), q/k/v/o 4096x4096, gate/up 11008x4096 and down 4096x11008:
224 matrices of 4096 singular-vector pairs, widths 0/2/3/4/8 bits. Singular values decay as a
power law with a per-matrix exponent and scale; the error of pair i at b bits is
sigma_i^2 * 4^-b times log-normal noise (so rows are sometimes non-convex, even non-monotone),
and sigma_i^2 when dropped. A pair at b > 0 bits costs b*(d_out + d_in) bits plus fp16
scale/zero per 128-group of u and v and an fp16 sigma; the budget is 16x, i.e. one bit per
delta element. Then times :func:`allocate_bits` per matrix (all 224) and model-wide (one table,
one budget), each with and without f_max = 3, and the OR-Tools MILP on a few matrices, and
checks that the MILP's error matches. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from compressor_svc.methods.bit_allocation import allocate_bits, allocate_bits_milp

WIDTHS = np.array([0, 2, 3, 4, 8], dtype=np.int64)
LAYERS = 32
SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
PAIRS = 4096
RATIO = 16
QUANT_GROUP = 128

Solver = Callable[..., npt.NDArray[np.int64]]


@dataclass(frozen=True)
class Table:
    """One matrix's allocation problem: errors and costs (PAIRS, len(WIDTHS)), budget in bits."""

    errors: npt.NDArray[np.float64]
    costs: npt.NDArray[np.int64]
    budget: int


def make_table(rng: np.random.Generator, d_out: int, d_in: int) -> Table:
    """A synthetic error/cost table for one d_out x d_in delta, see the module doc."""
    rank = np.arange(1, PAIRS + 1, dtype=np.float64)
    sigma2 = rng.lognormal(0.0, 1.0) * rank ** (-2 * rng.uniform(0.3, 0.9))
    noise = rng.lognormal(0.0, 0.35, size=(PAIRS, WIDTHS.size))
    errors = sigma2[:, None] * np.where(WIDTHS > 0, 4.0 ** (-WIDTHS) * noise, 1.0)
    groups = -(-d_out // QUANT_GROUP) - (-d_in // QUANT_GROUP)
    per_pair = np.where(WIDTHS > 0, WIDTHS * (d_out + d_in) + 32 * groups + 16, 0)
    costs = np.broadcast_to(per_pair, (PAIRS, WIDTHS.size)).astype(np.int64)
    return Table(errors, costs, d_out * d_in * 16 // RATIO)


def timed(solve: Solver, tables: list[Table], f_max: int | None) -> tuple[float, float]:
    """Seconds to solve every table and the summed error of the solutions."""
    start = time.perf_counter()
    choices = [solve(t.errors, t.costs, t.budget, max_distinct_widths=f_max) for t in tables]
    seconds = time.perf_counter() - start
    rows = np.arange(PAIRS)
    total = sum(float(t.errors[rows, x].sum()) for t, x in zip(tables, choices, strict=True))
    return seconds, total


def model_wide(tables: list[Table]) -> Table:
    """All tables stacked into one problem with the summed budget."""
    return Table(
        np.concatenate([t.errors for t in tables]),
        np.concatenate([t.costs for t in tables]),
        sum(t.budget for t in tables),
    )


def timed_model_wide(table: Table, f_max: int | None) -> tuple[float, float]:
    """Seconds and error of one model-wide solve."""
    start = time.perf_counter()
    choice = allocate_bits(table.errors, table.costs, table.budget, max_distinct_widths=f_max)
    seconds = time.perf_counter() - start
    return seconds, float(table.errors[np.arange(choice.size), choice].sum())


def main() -> None:
    """Build the table, time every variant, print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--milp-matrices", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    tables = [make_table(rng, *shape) for _ in range(LAYERS) for shape in SHAPES]
    whole = model_wide(tables)
    few = tables[: args.milp_matrices]
    print(f"{len(tables)} matrices x {PAIRS} pairs, widths {WIDTHS.tolist()}, {RATIO}x budget")
    print(f"{'variant':<34}{'f_max':>6}{'seconds':>10}{'total error':>16}")
    rows = [
        ("per matrix (224 solves)", None, timed(allocate_bits, tables, None)),
        ("per matrix (224 solves)", 3, timed(allocate_bits, tables, 3)),
        ("model-wide (one solve)", None, timed_model_wide(whole, None)),
        ("model-wide (one solve)", 3, timed_model_wide(whole, 3)),
        (f"exact, first {len(few)} matrices", None, timed(allocate_bits, few, None)),
        (f"MILP (SCIP), first {len(few)} matrices", None, timed(allocate_bits_milp, few, None)),
    ]
    for name, f_max, (seconds, error) in rows:
        print(f"{name:<34}{f_max or '-':>6}{seconds:>10.3f}{error:>16.9g}")
    gap = abs(rows[4][2][1] - rows[5][2][1]) / rows[5][2][1]
    print(f"exact vs MILP relative error difference: {gap:.2e}")


if __name__ == "__main__":
    main()
