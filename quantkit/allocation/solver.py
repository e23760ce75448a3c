"""Exact multiple-choice knapsack: one choice per unit, least total error, total bytes within a budget.

Each unit (a linear layer or a group of them) takes exactly one of its choices (bit widths). Choice ``c`` of
unit ``u`` writes ``costs[u][c]`` bytes and adds ``errors[u][c]`` to the (additive) error. :func:`solve`
minimizes the total error with the total bytes at most ``budget``, by dynamic programming over the bytes
when the table is small enough, else by an integer program (``scipy.optimize.milp``), else by a dynamic
program over costs rounded up to a coarser unit (feasible, not proven optimal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from quantkit.errors import QuantkitError

METHODS = ("auto", "dp", "ilp")
_OBJECTIVE_SCALE = 1e6
_ESTIMATE_CELLS = 1_000_000
_ILP_MAX_STEPS = 2**40


@dataclass(frozen=True)
class Solution:
    """The chosen index per unit, with the exact totals it adds up to."""

    choices: tuple[int, ...]
    error: float
    cost: int
    exact: bool
    method: str


@dataclass(frozen=True)
class _Problem:
    """The validated problem with dominated choices pruned; each unit's kept choices sorted by rising cost.

    ``shifted`` is each kept cost minus the unit's cheapest; ``room`` is the budget left once every unit has
    its cheapest choice, capped at the most the dearer choices can add. Kept errors strictly fall along
    each unit.
    """

    budget: int
    costs: tuple[tuple[int, ...], ...]
    errors: tuple[tuple[float, ...], ...]
    keep: tuple[tuple[int, ...], ...]
    shifted: tuple[tuple[int, ...], ...]
    kept_errors: tuple[tuple[float, ...], ...]
    room: int


def solve(
    costs: Sequence[Sequence[int]],
    errors: Sequence[Sequence[float]],
    budget: int,
    method: str = "auto",
    max_cells: int = 50_000_000,
) -> Solution:
    """The least-error choice per unit whose total cost is at most ``budget`` bytes.

    ``method``: ``"dp"`` (exact; fails when its table would exceed ``max_cells``), ``"ilp"`` (milp, exact to
    HiGHS's tolerances), or ``"auto"``: DP when it fits, else ILP, else DP on rounded-up costs. The result
    is never over budget; a milp answer over budget by float tolerance falls back to the rounded DP.
    """
    if method not in METHODS:
        raise QuantkitError(f"unknown allocation method {method!r}; choose one of {', '.join(METHODS)}")
    if not isinstance(max_cells, Integral) or isinstance(max_cells, bool) or max_cells < 1:
        raise QuantkitError(f"max_cells must be a positive int, got {max_cells!r}")
    problem = _build(costs, errors, budget)
    unit = math.gcd(*(c for row in problem.shifted for c in row)) or 1
    width = _width(problem, unit)
    cells = len(problem.keep) * width
    if method == "dp" and cells > max_cells:
        raise QuantkitError(
            f"the DP table needs {cells} cells, over max_cells={max_cells}; use method 'ilp' or 'auto', "
            "or raise max_cells"
        )
    if method == "dp" or (method == "auto" and cells <= max_cells):
        return _solution(problem, _dp(problem, unit, width), exact=True, method="dp")
    return _ilp_or_rounded(problem, unit, max_cells, forced=method == "ilp")


def _build(costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int) -> _Problem:
    """Validate the inputs, prune dominated choices and shift costs by each unit's cheapest."""
    cost_rows, error_rows = _validate(costs, errors, budget)
    floor = sum(min(row) for row in cost_rows)
    if budget < floor:
        raise QuantkitError(
            f"the budget of {budget} bytes is below the smallest possible allocation ({floor} bytes)"
        )
    keep = tuple(_frontier(c, e) for c, e in zip(cost_rows, error_rows))
    shifted = tuple(tuple(c[i] - c[k[0]] for i in k) for c, k in zip(cost_rows, keep))
    kept_errors = tuple(tuple(e[i] for i in k) for e, k in zip(error_rows, keep))
    room = min(int(budget) - floor, sum(row[-1] for row in shifted))
    return _Problem(int(budget), cost_rows, error_rows, keep, shifted, kept_errors, room)


def _validate(
    costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int
) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]]:
    """The costs as ints and errors as floats, or a QuantkitError naming the first problem found."""
    if not isinstance(budget, Integral) or isinstance(budget, bool):
        raise QuantkitError(f"the budget must be an int number of bytes, got {budget!r}")
    if len(costs) != len(errors):
        raise QuantkitError(f"costs has {len(costs)} units but errors has {len(errors)}")
    if len(costs) == 0:
        raise QuantkitError("there are no units to allocate")
    for u, (c, e) in enumerate(zip(costs, errors)):
        if len(c) != len(e):
            raise QuantkitError(f"unit {u} has {len(c)} costs but {len(e)} errors")
        if len(c) == 0:
            raise QuantkitError(f"unit {u} has no choices")
        for x in c:
            if not isinstance(x, Integral) or isinstance(x, bool) or x < 0:
                raise QuantkitError(f"unit {u} has a cost of {x!r}; costs must be non-negative ints")
        for x in e:
            if not isinstance(x, Real) or not math.isfinite(x):
                raise QuantkitError(f"unit {u} has an error of {x!r}; errors must be finite numbers")
    return tuple(tuple(int(x) for x in c) for c in costs), tuple(tuple(float(x) for x in e) for e in errors)


def _frontier(costs: tuple[int, ...], errors: tuple[float, ...]) -> tuple[int, ...]:
    """Indices of the undominated choices by rising cost; among equal choices the lowest index stays."""
    kept: list[int] = []
    for i in sorted(range(len(costs)), key=lambda i: (costs[i], errors[i], i)):
        if not kept or errors[i] < errors[kept[-1]]:
            kept.append(i)
    return tuple(kept)


def _steps(problem: _Problem, unit: int) -> list[list[int]]:
    """Each kept shifted cost in multiples of ``unit``, rounded up (exact when ``unit`` divides them)."""
    return [[-(-c // unit) for c in row] for row in problem.shifted]


def _width(problem: _Problem, unit: int) -> int:
    """DP table columns: the room in ``unit`` steps, plus one for none."""
    return problem.room // unit + 1


def _dp(problem: _Problem, unit: int, width: int) -> list[int]:
    """Optimal kept positions with the ``unit``-rounded total at most ``width - 1`` steps.

    ``best[b]`` is the least error of the units so far within ``b`` steps; ties keep the cheaper choice.
    """
    steps = _steps(problem, unit)
    best = np.zeros(width)
    picks = []
    for row, errs in zip(steps, problem.kept_errors):
        new = best + errs[0]
        pick = np.zeros(width, dtype=np.min_scalar_type(len(row) - 1))
        for j in range(1, len(row)):
            if row[j] >= width:
                break
            candidate = best[: width - row[j]] + errs[j]
            better = candidate < new[row[j] :]
            np.copyto(new[row[j] :], candidate, where=better)
            np.copyto(pick[row[j] :], j, where=better)
        picks.append(pick)
        best = new
    positions = []
    b = width - 1
    for row, pick in zip(reversed(steps), reversed(picks)):
        positions.append(int(pick[b]))
        b -= row[positions[-1]]
    return positions[::-1]


def _ilp_or_rounded(problem: _Problem, unit: int, max_cells: int, forced: bool) -> Solution:
    """The milp answer; the rounded DP's when milp is unavailable or fails (unless ``forced``: then raise)
    or when float tolerance put milp's answer over budget. A coarse rounded DP's answer scales milp's errors.

    Beyond ``_ILP_MAX_STEPS`` steps of room, float tolerance would blur single steps: milp then works on
    costs rounded up to a coarser step, which keeps its answer feasible but no longer proven optimal.
    """
    step = max(unit, -(-problem.room // _ILP_MAX_STEPS))
    estimate = _rounded(problem, min(max_cells, _ESTIMATE_CELLS)).error
    try:
        positions = _ilp(problem, step, estimate - math.fsum(e[-1] for e in problem.kept_errors))
    except QuantkitError:
        if forced:
            raise
        return _rounded(problem, max_cells)
    solution = _solution(problem, positions, exact=step == unit, method="ilp")
    return solution if solution.cost <= problem.budget else _rounded(problem, max_cells)


def _ilp(problem: _Problem, step: int, excess: float) -> list[int]:
    """Optimal kept positions by milp over one-hot binaries: one equality per unit, one budget row.

    Costs count in ``step`` units, rounded up (exact when ``step`` divides them), and the budget row is
    divided by the room, which spares HiGHS's presolve huge coefficients. Each unit's errors are
    shifted to start at zero and scaled so that ``excess``, the shifted total of a feasible answer, becomes
    ``_OBJECTIVE_SCALE``: HiGHS's absolute gap (1e-6) then stays far below the optimum whatever the errors'
    magnitude. The scaling is clamped so that no coefficient exceeds ``_OBJECTIVE_SCALE ** 2``.
    """
    try:
        from scipy.optimize import LinearConstraint, milp
        from scipy.sparse import csr_array
    except ImportError as exc:
        raise QuantkitError("method 'ilp' needs scipy, which is not installed") from exc
    spread = max(e[0] - e[-1] for e in problem.kept_errors)
    factor = _OBJECTIVE_SCALE / (max(excess, spread / _OBJECTIVE_SCALE) or 1.0)
    sizes = [len(row) for row in problem.shifted]
    starts = np.cumsum([0, *sizes])
    objective = np.concatenate([np.array(e) - e[-1] for e in problem.kept_errors]) * factor
    one_hot = csr_array(
        (np.ones(starts[-1]), np.arange(starts[-1]), starts), shape=(len(sizes), int(starts[-1]))
    )
    room = problem.room // step
    weights = np.array([c for row in _steps(problem, step) for c in row], dtype=np.float64)
    result = milp(
        objective,
        integrality=np.ones(starts[-1]),
        bounds=(0, 1),
        constraints=[
            LinearConstraint(one_hot, 1, 1),
            LinearConstraint(weights[None, :] / max(room, 1), -np.inf, min(room, 1)),
        ],
        options={"mip_rel_gap": 0.0},
    )
    if result.status != 0 or result.x is None:
        raise QuantkitError(f"milp found no optimal allocation: {result.message}")
    return [int(np.argmax(result.x[a:b])) for a, b in zip(starts[:-1], starts[1:])]


def _rounded(problem: _Problem, max_cells: int) -> Solution:
    """DP on costs rounded up to the smallest unit found whose table fits ``max_cells`` (never over budget).

    Rounding up keeps the answer feasible in true bytes: the rounded total bounds the true one from above.
    """
    unit = problem.room // max(1, max_cells // len(problem.keep)) + 1
    return _solution(problem, _dp(problem, unit, _width(problem, unit)), exact=False, method="dp-rounded")


def _solution(problem: _Problem, positions: list[int], exact: bool, method: str) -> Solution:
    """Map kept positions back to original indices and total the true costs and errors exactly."""
    choices = tuple(k[p] for k, p in zip(problem.keep, positions))
    return Solution(
        choices=choices,
        error=math.fsum(e[i] for e, i in zip(problem.errors, choices)),
        cost=sum(c[i] for c, i in zip(problem.costs, choices)),
        exact=exact,
        method=method,
    )
