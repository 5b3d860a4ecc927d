"""Exact bit allocation: optimality against brute force and the OR-Tools MILP, input checks."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from compressor_svc.methods.bit_allocation import allocate_bits, allocate_bits_milp

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Instance:
    """A small allocation problem: errors and costs (n, w), budget, optional f_max."""

    errors: FloatArray
    costs: IntArray
    budget: int
    f_max: int | None

    def error_of(self, choice: IntArray) -> float:
        """Total error of ``choice``, (n,) column indices."""
        return float(self.errors[np.arange(choice.size), choice].sum())

    def assert_feasible(self, choice: IntArray) -> None:
        """``choice`` is one int64 column per group, within budget and the width limit."""
        assert choice.dtype == np.int64
        assert choice.shape == (self.errors.shape[0],)
        assert int(self.costs[np.arange(choice.size), choice].sum()) <= self.budget
        if self.f_max is not None:
            assert np.unique(choice).size <= self.f_max


@st.composite
def instances(draw: st.DrawFn) -> Instance:
    """Random non-monotone errors, integer costs, budgets around the feasible range."""
    n = draw(st.integers(1, 6))
    w = draw(st.integers(1, 4))
    errors = draw(arrays(np.float64, (n, w), elements=st.floats(0.0, 100.0)))
    costs = draw(arrays(np.int64, (n, w), elements=st.integers(0, 20)))
    low, high = int(costs.min(axis=1).sum()), int(costs.max(axis=1).sum())
    budget = draw(st.integers(low - 3, high + 3))
    f_max = draw(st.none() | st.integers(1, w))
    return Instance(errors, costs, budget, f_max)


def brute_force(inst: Instance) -> float | None:
    """Least total error over every feasible choice (itertools.product), None if none fits."""
    n, w = inst.errors.shape
    combos = np.array(list(itertools.product(range(w), repeat=n)), dtype=np.int64)
    rows = np.arange(n)
    fits = inst.costs[rows, combos].sum(axis=1) <= inst.budget
    if inst.f_max is not None:
        fits &= np.array([np.unique(c).size <= inst.f_max for c in combos])
    if not fits.any():
        return None
    return float(inst.errors[rows, combos[fits]].sum(axis=1).min())


def solve(inst: Instance, *, milp: bool = False) -> IntArray:
    """Run one of the two solvers on ``inst``."""
    allocate = allocate_bits_milp if milp else allocate_bits
    return allocate(inst.errors, inst.costs, inst.budget, max_distinct_widths=inst.f_max)


def check_against_brute_force(inst: Instance, *, milp: bool, abs_tol: float) -> None:
    """The solver's choice is feasible and optimal, or it raises when nothing fits."""
    best = brute_force(inst)
    if best is None:
        with pytest.raises(ValueError, match="budget"):
            solve(inst, milp=milp)
        return
    choice = solve(inst, milp=milp)
    inst.assert_feasible(choice)
    assert math.isclose(inst.error_of(choice), best, rel_tol=1e-9, abs_tol=abs_tol)


@settings(max_examples=300, deadline=None)
@given(instances())
def test_exact_solver_matches_brute_force(inst: Instance) -> None:
    check_against_brute_force(inst, milp=False, abs_tol=1e-12)


@settings(max_examples=60, deadline=None)
@given(instances())
def test_milp_matches_brute_force(inst: Instance) -> None:
    # SCIP prunes with an absolute epsilon of 1e-9.
    check_against_brute_force(inst, milp=True, abs_tol=1e-8)


@settings(max_examples=50, deadline=None)
@given(instances())
def test_deterministic(inst: Instance) -> None:
    if brute_force(inst) is not None:
        np.testing.assert_array_equal(solve(inst), solve(inst))


def rank_table(n: int, seed: int) -> Instance:
    """Delta-CoMe-shaped instance: decaying sigma^2, noisy 4^-b errors, widths 0/2/3/8 bits."""
    rng = np.random.default_rng(seed)
    widths = np.array([0, 2, 3, 8])
    sigma2 = np.arange(1, n + 1, dtype=np.float64) ** -1.2
    noise = rng.lognormal(0.0, 0.4, size=(n, widths.size))
    errors = sigma2[:, None] * np.where(widths > 0, 4.0**-widths * noise, 1.0)
    costs = np.where(widths > 0, widths * (512 + 256) + 112, 0).astype(np.int64)
    return Instance(errors, np.tile(costs, (n, 1)), 0, None)


def test_deltacome_split_is_feasible_and_never_beats_optimum() -> None:
    table = rank_table(256, seed=0)
    split = np.repeat(np.array([3, 2, 1]), [8, 40, 208]).astype(np.int64)  # 8/3/2 bits by rank
    budget = int(table.costs[np.arange(256), split].sum())
    for f_max in (None, 3):
        inst = Instance(table.errors, table.costs, budget, f_max)
        inst.assert_feasible(split)
        best = solve(inst)
        inst.assert_feasible(best)
        assert inst.error_of(best) <= inst.error_of(split)
        assert math.isclose(inst.error_of(best), inst.error_of(solve(inst, milp=True)))


@pytest.mark.parametrize("f_max", [None, 1, 2, 3])
def test_matches_milp_on_mixed_cost_units(f_max: int | None) -> None:
    rng = np.random.default_rng(7)
    n, w = 150, 5
    errors = rng.lognormal(0.0, 1.0, (n, 1)) * 4.0 ** -np.arange(w) * rng.lognormal(0, 0.6, (n, w))
    costs = np.arange(w) * rng.integers(1, 60, (n, 1)) + rng.integers(0, 7, (n, 1))
    costs[:, 0] = 0
    inst = Instance(errors, costs.astype(np.int64), int(costs.sum() * 0.3), f_max)
    ours, reference = solve(inst), solve(inst, milp=True)
    inst.assert_feasible(ours)
    assert math.isclose(inst.error_of(ours), inst.error_of(reference), rel_tol=1e-9)


def test_edge_budgets() -> None:
    errors = np.array([[5.0, 1.0, 2.0], [4.0, 3.0, 0.5]])
    costs = np.array([[1, 3, 2], [0, 2, 5]], dtype=np.int64)
    assert allocate_bits(errors, costs, 1).tolist() == [0, 0]
    assert allocate_bits(errors, costs, 10**30).tolist() == [1, 2]
    assert allocate_bits(errors, costs, 10**30, max_distinct_widths=1).tolist() == [2, 2]
    empty = allocate_bits(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), 0)
    assert empty.shape == (0,)
    assert empty.dtype == np.int64
    with pytest.raises(ValueError, match="cheapest allocation, 1 bits"):
        allocate_bits(errors, costs, 0)


def test_ties_are_resolved_to_feasible_optimum() -> None:
    errors = np.ones((40, 4))
    costs = np.tile(np.array([0, 2, 3, 4], dtype=np.int64), (40, 1))
    choice = allocate_bits(errors, costs, 7)
    assert float(errors[np.arange(40), choice].sum()) == 40.0
    np.testing.assert_array_equal(choice, allocate_bits(errors, costs, 7))


GOOD_E = np.ones((2, 3))
GOOD_C = np.ones((2, 3), dtype=np.int64)


@pytest.mark.parametrize(
    ("errors", "costs", "budget", "f_max", "message"),
    [
        (np.ones(3), np.ones(3, dtype=np.int64), 5, None, "2-D"),
        (np.ones((2, 0)), np.ones((2, 0), dtype=np.int64), 5, None, "2-D"),
        (GOOD_E, np.ones((2, 2), dtype=np.int64), 5, None, "differs"),
        (np.array([[1.0, np.nan, 1.0]] * 2), GOOD_C, 5, None, "NaN"),
        (np.array([[1.0, np.inf, 1.0]] * 2), GOOD_C, 5, None, "infinity"),
        (GOOD_E, -GOOD_C, 5, None, "non-negative"),
        (GOOD_E, GOOD_C.astype(np.float64), 5, None, "integers"),
        (GOOD_E, GOOD_C, 5.0, None, "budget must be an integer"),
        (GOOD_E, GOOD_C, 5, 0, "at least 1"),
        (GOOD_E, GOOD_C, 1, None, "cheapest allocation"),
        (GOOD_E, np.array([[1, 9, 9], [9, 1, 9]]), 3, 1, "at most 1 distinct widths"),
        (GOOD_E, np.full((2, 3), 1 << 61), 5, None, "overflow"),
    ],
)
def test_rejects_bad_input(
    errors: FloatArray, costs: IntArray, budget: int, f_max: int | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        allocate_bits(errors, costs, budget, max_distinct_widths=f_max)


def test_milp_rejects_infeasible() -> None:
    with pytest.raises(ValueError, match="infeasible"):
        allocate_bits_milp(GOOD_E, GOOD_C, 1)
