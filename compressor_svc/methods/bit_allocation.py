"""Exact bit allocation: ADAMIX's 0/1 program (SCIENCE.md §2) as a multiple-choice knapsack.

Every group i (a singular-vector pair, or any unit that gets one width) picks one width column
j; picking it adds ``errors[i, j]`` to the objective and ``costs[i, j]`` bits to the total, which
must stay within ``budget``; optionally at most ``max_distinct_widths`` columns may be used.

:func:`allocate_bits` solves this exactly and fast; :func:`allocate_bits_milp` is the paper's
x_{i,b} / y_b integer program handed to OR-Tools (SCIP), kept as the independent reference.

Why :func:`allocate_bits` is exact, for any errors (non-convex, non-monotone) and any
non-negative integer costs:

1. *Lagrangian bound.* For any λ ≥ 0 and any feasible choice x,
   ``Σ_i e[i, x_i] = L(λ) + Σ_i r[i, x_i] + λ·slack(x)`` with ``m_i = min_j (e[i,j] + λ c[i,j])``,
   ``L(λ) = Σ_i m_i - λ·budget``, reduced costs ``r[i,j] = e[i,j] + λ c[i,j] - m_i ≥ 0`` and
   ``slack(x) = budget - Σ_i c[i, x_i] ≥ 0``. λ is the LP-optimal multiplier, read off the
   lower convex hulls of the groups (the classic greedy LP of the multiple-choice knapsack).
2. *Reduced-cost fixing.* If a feasible incumbent has error U, every solution at least as good
   satisfies ``Σ_i r[i, x_i] ≤ U - L(λ)``, so every option it uses has ``r ≤ U - L(λ)``. All
   other options are discarded; a group left with one option is fixed to it.
3. *Exact search on the core.* The remaining groups (tens to hundreds of 4096) are solved by a
   dynamic program over Pareto-optimal (bits, error) states, exact in integer bits. States
   whose Lagrangian completion bound exceeds U are pruned, which cannot remove a solution
   better than the incumbent.
4. *Expanding core.* The first search allows only options with tiny reduced cost (a cheap,
   strong incumbent); it is repeated with threshold ``U - L(λ)`` until the threshold used
   covers it, which by 2. proves optimality.

Floating point: bounds are compared with a relative slack of ``_REL_TOL`` times the size of the
objective, which only keeps more options and states; bits are summed in int64 and never exceed
the budget. ``max_distinct_widths = f`` enumerates the column subsets of size ``f``, solves
them in order of their LP bound, and stops once a bound cannot beat the best solution found.

Ties are broken deterministically: the result depends only on the inputs.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from ortools.linear_solver import pywraplp  # type: ignore[import-untyped]

__all__ = ["allocate_bits", "allocate_bits_milp"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_REL_TOL = 1e-11
_SEED_CORE_ROWS = 64
_MAX_TOTAL_BITS = 1 << 62


def allocate_bits(
    errors: FloatArray,
    costs: IntArray,
    budget: int,
    *,
    max_distinct_widths: int | None = None,
) -> IntArray:
    """Minimum-error width choice per group under a bit budget (exact).

    Args:
        errors: (n_groups, n_widths) float, error if group i gets width column j.
        costs: (n_groups, n_widths) non-negative integers, bits group i costs at column j.
        budget: total bits allowed; the chosen costs sum to at most this.
        max_distinct_widths: if given, at most this many distinct columns are used (f_max).

    Returns:
        (n_groups,) int64, the chosen column per group.

    Raises:
        ValueError: malformed input, or no choice fits the budget.
    """
    e, c, bits, limit = _validated(errors, costs, budget, max_distinct_widths)
    if limit >= e.shape[1]:
        return _solve_all_columns(e, c, bits)
    return _solve_width_limited(e, c, bits, limit)


def allocate_bits_milp(
    errors: FloatArray,
    costs: IntArray,
    budget: int,
    *,
    max_distinct_widths: int | None = None,
) -> IntArray:
    """The paper's 0/1 program, solved by SCIP through OR-Tools with a zero optimality gap.

    Variables x[i, j] (group i gets column j) and, with ``max_distinct_widths``, y[j] (column j
    is used). Same arguments, result and errors as :func:`allocate_bits`; the returned choice is
    re-checked in integers against the budget and the width limit.

    Raises:
        ValueError: malformed input, or the program is infeasible.
        RuntimeError: SCIP did not prove optimality, or its answer fails the integer re-check.
    """
    e, c, bits, limit = _validated(errors, costs, budget, max_distinct_widths)
    solver = pywraplp.Solver.CreateSolver("SCIP")
    x = _milp_model(solver, e, c, bits, limit)
    params = pywraplp.MPSolverParameters()
    params.SetDoubleParam(params.RELATIVE_MIP_GAP, 0.0)
    status = solver.Solve(params)
    if status == pywraplp.Solver.INFEASIBLE:
        raise ValueError(f"no allocation fits the budget of {bits} bits (MILP infeasible)")
    if status != pywraplp.Solver.OPTIMAL:
        raise RuntimeError(f"SCIP stopped without proving optimality (status {status})")
    values = np.array([[v.solution_value() for v in row] for row in x]).reshape(e.shape)
    return _checked_milp_choice(values, c, bits, limit)


def _validated(
    errors: FloatArray, costs: IntArray, budget: int, max_distinct_widths: int | None
) -> tuple[FloatArray, IntArray, int, int]:
    """Checked inputs: errors (n, w) float64, costs (n, w) int64, budget, width limit (≤ w).

    A budget above the dearest possible total is lowered to it, which changes no answer.
    """
    e = np.asarray(errors, dtype=np.float64)
    raw = np.asarray(costs)
    if e.ndim != 2 or e.shape[1] == 0:
        raise ValueError(f"errors must be 2-D (n_groups, n_widths ≥ 1), got shape {e.shape}")
    if raw.shape != e.shape:
        raise ValueError(f"costs shape {raw.shape} differs from errors shape {e.shape}")
    if not np.isfinite(e).all():
        raise ValueError("errors contain NaN or infinity")
    if raw.dtype == np.bool_ or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"costs must be integers, got dtype {raw.dtype}")
    c = raw.astype(np.int64)
    if (c < 0).any():
        raise ValueError("costs must be non-negative")
    if c.size and int(c.max()) * c.shape[0] >= _MAX_TOTAL_BITS:
        raise ValueError("costs too large: their total could overflow int64")
    most = int(c.max(axis=1, initial=0).sum())
    limit = _width_limit(max_distinct_widths, e.shape[1])
    return e, c, min(_integer(budget, "budget"), most), limit


def _integer(value: int, name: str) -> int:
    """``value`` as a Python int; ValueError naming ``name`` when it is not an integer."""
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _width_limit(max_distinct_widths: int | None, n_widths: int) -> int:
    """The effective f_max: ``n_widths`` when unlimited, else the checked value capped at it."""
    if max_distinct_widths is None:
        return n_widths
    limit = _integer(max_distinct_widths, "max_distinct_widths")
    if limit < 1:
        raise ValueError(f"max_distinct_widths must be at least 1, got {limit}")
    return min(limit, n_widths)


def _raise_if_over(cheapest: int, budget: int, what: str) -> None:
    """ValueError naming the cheapest possible total when it exceeds the budget."""
    if cheapest > budget:
        raise ValueError(
            f"budget of {budget} bits is below the cheapest allocation, {cheapest} bits ({what})"
        )


@dataclass(frozen=True)
class _Relaxation:
    """LP relaxation of one problem: multiplier, bound, and a feasible rounding.

    Attributes:
        lam: the LP-optimal Lagrange multiplier λ ≥ 0 of the budget row.
        row_min: (n,) m_i = min_j (e[i, j] + λ c[i, j]).
        bound: L(λ) = Σ m_i - λ·budget, a lower bound on the optimal error.
        incumbent: (n,) a feasible choice, the LP solution without its fractional group.
    """

    lam: float
    row_min: FloatArray
    bound: float
    incumbent: IntArray


@dataclass(frozen=True)
class _Hull:
    """Lower convex hulls of all groups, walked from each group's cheapest column.

    Attributes:
        points: (n, w) column reached after k hull steps, -1 past the hull's end; column 0
            is the group's cheapest column (least error among equal costs).
        slope: (n, w - 1) error saved per extra bit by step k, non-increasing along a row.
        extra: (n, w - 1) extra bits of step k (0 past the hull's end).
    """

    points: IntArray
    slope: FloatArray
    extra: IntArray


def _hull(e: FloatArray, c: IntArray) -> _Hull:
    """Walk every group's lower convex hull at once (gift wrapping, w - 1 vectorised steps)."""
    n, w = e.shape
    rows = np.arange(n)
    points = np.full((n, w), -1, dtype=np.int64)
    slope = np.full((n, w - 1), -np.inf)
    extra = np.zeros((n, w - 1), dtype=np.int64)
    cur = points[:, 0] = np.lexsort((e, c), axis=1)[:, 0]
    for k in range(w - 1):
        nxt, gain = _best_step(e, c, cur)
        live = np.isfinite(gain)
        points[live, k + 1] = nxt[live]
        extra[live, k] = c[rows, nxt][live] - c[rows, cur][live]
        slope[live, k] = np.minimum(gain[live], slope[live, k - 1]) if k else gain[live]
        cur = np.where(live, nxt, cur)
    return _Hull(points, slope, extra)


def _best_step(e: FloatArray, c: IntArray, cur: IntArray) -> tuple[IntArray, FloatArray]:
    """Per group, the next hull column after ``cur`` and its slope (-inf where there is none).

    The next column costs more and errs less than ``cur`` and saves the most error per extra
    bit; among equal slopes the farthest is taken, skipping collinear points.
    """
    rows = np.arange(e.shape[0])
    dc = c - c[rows, cur][:, None]
    de = e[rows, cur][:, None] - e
    ok = (dc > 0) & (de > 0)
    slope = np.where(ok, de / np.where(ok, dc, 1), -np.inf)
    best = slope.max(axis=1)
    tie = ok & (slope == best[:, None])
    return np.argmax(np.where(tie, dc, -1), axis=1), best


def _relax(e: FloatArray, c: IntArray, budget: int) -> _Relaxation:
    """The LP relaxation by the greedy on hull steps, best slope first (exact for the LP).

    Steps are taken while they fit; the first that does not is the fractional one and its
    slope is the LP multiplier λ (0 when every step fits). Requires a feasible budget.
    """
    n = e.shape[0]
    rows = np.arange(n)
    hull = _hull(e, c)
    group, rank = np.nonzero(hull.points[:, 1:] >= 0)
    slope = hull.slope[group, rank]
    order = np.lexsort((group, rank, -slope))
    spent = int(c[rows, hull.points[:, 0]].sum()) + np.cumsum(hull.extra[group, rank][order])
    fits = int(np.searchsorted(spent, budget, side="right"))
    lam = float(slope[order[fits]]) if fits < order.size else 0.0
    incumbent = hull.points[rows, np.bincount(group[order[:fits]], minlength=n)]
    row_min = (e + lam * c).min(axis=1)
    return _Relaxation(lam, row_min, float(row_min.sum()) - lam * budget, incumbent)


def _solve_all_columns(e: FloatArray, c: IntArray, budget: int) -> IntArray:
    """Exact optimum with every column allowed; ValueError when nothing fits the budget."""
    _raise_if_over(int(c.min(axis=1).sum()), budget, "every group at its cheapest width")
    if e.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return _solve(e, c, budget, _relax(e, c, budget))[0]


def _solve_width_limited(e: FloatArray, c: IntArray, budget: int, limit: int) -> IntArray:
    """Exact optimum using at most ``limit`` < w distinct columns.

    Every solution lives in some ``limit``-column subset, so the best subset optimum is the
    answer. Subsets are solved in order of their LP bound; once a bound reaches the best error
    found, no later subset can improve on it.
    """
    subsets = [np.array(s) for s in itertools.combinations(range(e.shape[1]), limit)]
    cheapest = [int(c[:, s].min(axis=1).sum()) for s in subsets]
    _raise_if_over(min(cheapest), budget, f"at most {limit} distinct widths")
    if e.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    feasible = [s for s, bits in zip(subsets, cheapest, strict=True) if bits <= budget]
    relaxed = sorted(
        ((_relax(e[:, s], c[:, s], budget), s) for s in feasible), key=lambda r: r[0].bound
    )
    best, best_err = relaxed[0][1], np.inf
    for relax, cols in relaxed:
        if relax.bound >= best_err:
            break
        choice, err = _solve(e[:, cols], c[:, cols], budget, relax)
        if err < best_err:
            best, best_err = cols[choice], err
    return best


def _solve(e: FloatArray, c: IntArray, budget: int, relax: _Relaxation) -> tuple[IntArray, float]:
    """Exact optimum and its error by reduced-cost fixing on an expanding core (module doc).

    The LP rounding is returned at once when it meets the bound L(λ). Otherwise each round
    keeps the options with reduced cost ≤ ``threshold`` and searches them exactly; it ends when
    the threshold covers U - L(λ) for the best error U found, at which point no discarded
    option can be part of a better solution.
    """
    rows = np.arange(e.shape[0])
    reduced = e + relax.lam * c - relax.row_min[:, None]
    tol = _REL_TOL * (float(np.abs(e).max(axis=1).sum()) + relax.lam * budget)
    choice = relax.incumbent
    best = float(e[rows, choice].sum())
    if best - relax.bound <= tol:
        return choice, best
    threshold = _seed_threshold(reduced) + tol
    while True:
        choice = _search(e, c, budget, reduced <= threshold, lam=relax.lam, limit=best + tol)
        best = float(e[rows, choice].sum())
        needed = best - relax.bound + tol
        if threshold >= needed:
            return choice, best
        threshold = needed


def _seed_threshold(reduced: FloatArray) -> float:
    """A reduced-cost threshold that leaves about ``_SEED_CORE_ROWS`` groups with a choice."""
    if reduced.shape[1] < 2:
        return 0.0
    second = np.partition(reduced, 1, axis=1)[:, 1]
    k = min(_SEED_CORE_ROWS, second.size) - 1
    return float(np.partition(second, k)[k])


def _search(
    e: FloatArray, c: IntArray, budget: int, allowed: BoolArray, *, lam: float, limit: float
) -> IntArray:
    """Best choice among ``allowed`` options, pruning what provably errs more than ``limit``.

    Groups with a single allowed option are fixed to it; the rest go to the Pareto DP. Every
    group's reduced-cost minimiser is allowed and the caller's incumbent lies inside the
    allowed set within ``limit``, so a solution always exists.
    """
    count = allowed.sum(axis=1)
    choice: IntArray = np.argmax(allowed, axis=1).astype(np.int64)
    fixed = np.flatnonzero(count == 1)
    core = np.flatnonzero(count > 1)
    cap = budget - int(c[fixed, choice[fixed]].sum())
    spent = float(e[fixed, choice[fixed]].sum())
    choice[core] = _pareto_dp(e[core], c[core], allowed[core], cap, lam=lam, limit=limit - spent)
    return choice


@dataclass(frozen=True)
class _Suffix:
    """Bounds on groups p, p+1, … of the core, (k + 1,) arrays ending in 0.

    Attributes:
        min_cost: least bits those groups can take.
        max_cost: most bits those groups can take.
        row_min: Σ min_j (e + λ c) over their allowed options.
    """

    min_cost: IntArray
    max_cost: IntArray
    row_min: FloatArray


def _suffix(e: FloatArray, c: IntArray, allowed: BoolArray, lam: float) -> _Suffix:
    """Suffix sums of per-group bounds over the allowed options, for the DP's pruning."""
    big = np.iinfo(np.int64).max

    def tail(x: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        return np.concatenate([np.cumsum(x[::-1])[::-1], np.zeros(1, dtype=x.dtype)])

    return _Suffix(
        tail(np.where(allowed, c, big).min(axis=1)).astype(np.int64),
        tail(np.where(allowed, c, -1).max(axis=1)).astype(np.int64),
        tail(np.where(allowed, e + lam * c, np.inf).min(axis=1)).astype(np.float64),
    )


def _pareto_dp(
    e: FloatArray, c: IntArray, allowed: BoolArray, cap: int, *, lam: float, limit: float
) -> IntArray:
    """Exact core search: the least-error choice within ``cap`` bits, (k,) columns.

    States are (bits, error) of a choice for the first p groups, kept only when Pareto-optimal
    (no other state has fewer or equal bits and less error), when the rest can still fit, and
    when the Lagrangian bound on completing it, error + Σ_rest m - λ·min(cap - bits, max rest
    bits), is at most ``limit``.
    """
    bound = _suffix(e, c, allowed, lam)
    bits = np.zeros(1, dtype=np.int64)
    err = np.zeros(1)
    history: list[tuple[IntArray, IntArray]] = []
    for p in range(e.shape[0]):
        opts = np.flatnonzero(allowed[p])
        parent = np.repeat(np.arange(bits.size), opts.size)
        option = np.tile(opts, bits.size)
        bits = bits[parent] + c[p, option]
        err = err[parent] + e[p, option]
        room = cap - bits
        lower = err + bound.row_min[p + 1] - lam * np.minimum(room, bound.max_cost[p + 1])
        alive = np.flatnonzero((room >= bound.min_cost[p + 1]) & (lower <= limit))
        kept = alive[_pareto(bits[alive], err[alive])]
        bits, err = bits[kept], err[kept]
        history.append((parent[kept], option[kept]))
    return _trace(history, int(np.argmin(err)))


def _pareto(bits: IntArray, err: FloatArray) -> IntArray:
    """Indices of the Pareto-optimal states, by increasing bits (ties keep the first state)."""
    order = np.lexsort((err, bits))
    ranked = err[order]
    keep = np.ones(order.size, dtype=np.bool_)
    keep[1:] = ranked[1:] < np.minimum.accumulate(ranked)[:-1]
    return order[keep]


def _trace(history: list[tuple[IntArray, IntArray]], state: int) -> IntArray:
    """Columns of the DP path ending in ``state``, read backwards through ``history``."""
    out = np.empty(len(history), dtype=np.int64)
    for p in range(len(history) - 1, -1, -1):
        parent, option = history[p]
        out[p] = option[state]
        state = int(parent[state])
    return out


def _milp_model(
    solver: pywraplp.Solver, e: FloatArray, c: IntArray, budget: int, limit: int
) -> list[list[pywraplp.Variable]]:
    """Build the paper's program in ``solver``; returns x[i][j]. y[j] only when limit < w."""
    n, w = e.shape
    x = [[solver.BoolVar(f"x_{i}_{j}") for j in range(w)] for i in range(n)]
    objective = solver.Objective()
    bits = solver.Constraint(-solver.infinity(), float(budget), "budget")
    for i, row in enumerate(x):
        one = solver.Constraint(1.0, 1.0, f"one_{i}")
        for j, var in enumerate(row):
            one.SetCoefficient(var, 1.0)
            bits.SetCoefficient(var, float(c[i, j]))
            objective.SetCoefficient(var, float(e[i, j]))
    objective.SetMinimization()
    if limit < w:
        _milp_width_limit(solver, x, limit)
    return x


def _milp_width_limit(
    solver: pywraplp.Solver, x: list[list[pywraplp.Variable]], limit: int
) -> None:
    """Add y[j] ≥ x[i][j] for all i, j and Σ_j y[j] ≤ limit."""
    y = [solver.BoolVar(f"y_{j}") for j in range(len(x[0]))] if x else []
    for row in x:
        for var, used in zip(row, y, strict=True):
            link = solver.Constraint(-solver.infinity(), 0.0)
            link.SetCoefficient(var, 1.0)
            link.SetCoefficient(used, -1.0)
    count = solver.Constraint(-solver.infinity(), float(limit), "distinct_widths")
    for used in y:
        count.SetCoefficient(used, 1.0)


def _checked_milp_choice(values: FloatArray, c: IntArray, budget: int, limit: int) -> IntArray:
    """Round the MILP's x to a choice and re-check it exactly in integers."""
    choice: IntArray = np.argmax(values, axis=1).astype(np.int64)
    rows = np.arange(values.shape[0])
    if (values[rows, choice] < 0.5).any():
        raise RuntimeError("MILP solution is not integral")
    if int(c[rows, choice].sum()) > budget:
        raise RuntimeError("MILP solution exceeds the budget beyond its feasibility tolerance")
    if np.unique(choice).size > limit:
        raise RuntimeError("MILP solution uses more distinct widths than allowed")
    return choice
