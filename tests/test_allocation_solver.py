"""The multiple-choice knapsack solver against brute force, at the edges, and at a realistic size."""

from __future__ import annotations

import itertools
import math
import random
import sys
import time

import pytest

from quantkit.allocation.solver import Solution, solve
from quantkit.errors import QuantkitError


def random_problem(rng: random.Random) -> tuple[list[list[int]], list[list[float]], int]:
    """1-6 units of 1-4 choices: costs sometimes shared or in 4096-byte pages, errors sometimes tied."""
    units = rng.randint(1, 6)
    scale = rng.choice([1, 1, 4096, 3 * 4096])
    costs, errors = [], []
    for _ in range(units):
        k = rng.randint(1, 4)
        row = [rng.randint(0, 12) * scale + rng.choice([0, 0, rng.randint(0, 3)]) for _ in range(k)]
        if k > 1 and rng.random() < 0.3:
            row[1] = row[0]
        errs = [rng.choice([0.5, 1.0, 2.0]) if rng.random() < 0.3 else rng.uniform(0, 5) for _ in range(k)]
        costs.append(row)
        errors.append(errs)
    floor = sum(min(row) for row in costs)
    top = sum(max(row) for row in costs)
    return costs, errors, rng.randint(floor, top + scale)


def brute_force(costs: list[list[int]], errors: list[list[float]], budget: int) -> float:
    """The least total error over every feasible combination."""
    return min(
        sum(errors[u][c] for u, c in enumerate(combo))
        for combo in itertools.product(*(range(len(row)) for row in costs))
        if sum(costs[u][c] for u, c in enumerate(combo)) <= budget
    )


def check_consistent(solution: Solution, costs: list[list[int]], errors: list[list[float]], budget: int):
    """The reported totals are the chosen ones and within budget."""
    assert len(solution.choices) == len(costs)
    assert solution.cost == sum(costs[u][c] for u, c in enumerate(solution.choices))
    assert solution.error == pytest.approx(sum(errors[u][c] for u, c in enumerate(solution.choices)))
    assert solution.cost <= budget


@pytest.mark.parametrize("method", ["dp", "ilp", "auto"])
def test_matches_brute_force(method: str):
    rng = random.Random(1234)
    for _ in range(300 if method != "ilp" else 120):
        costs, errors, budget = random_problem(rng)
        solution = solve(costs, errors, budget, method=method)
        check_consistent(solution, costs, errors, budget)
        assert solution.exact
        assert solution.method == ("ilp" if method == "ilp" else "dp")
        assert solution.error == pytest.approx(brute_force(costs, errors, budget), rel=1e-12, abs=1e-12)


def test_rounded_dp_is_feasible_and_never_better(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # as if scipy were not installed
    rng = random.Random(99)
    rounded = 0
    for _ in range(300):
        costs, errors, budget = random_problem(rng)
        solution = solve(costs, errors, budget, max_cells=len(costs) * 3)
        check_consistent(solution, costs, errors, budget)
        assert solution.error >= brute_force(costs, errors, budget) - 1e-12
        assert solution.exact == (solution.method == "dp")
        rounded += solution.method == "dp-rounded"
    assert rounded > 100


def test_forced_ilp_without_scipy(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    with pytest.raises(QuantkitError, match="needs scipy"):
        solve([[0, 1]], [[1.0, 0.0]], 1, method="ilp")


def test_auto_uses_ilp_when_dp_does_not_fit():
    costs = [[0, 1_000_003, 2_000_011], [5, 700_001, 1_400_017]]
    errors = [[3.0, 1.0, 0.0], [2.0, 0.5, 0.1]]
    solution = solve(costs, errors, 2_100_000, max_cells=100)
    assert (solution.method, solution.exact) == ("ilp", True)
    assert solution.error == pytest.approx(brute_force(costs, errors, 2_100_000))


def test_ilp_with_huge_coprime_costs_stays_within_budget():
    rng = random.Random(3)
    for _ in range(25):
        costs = [[rng.randint(0, 10**15) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(2, 5))]
        errors = [[rng.random() for _ in row] for row in costs]
        totals = [sum(combo) for combo in itertools.product(*costs)]
        budget = rng.choice(totals) - rng.choice([0, 1])  # tight: a total hits the budget or misses by a byte
        budget = max(budget, min(totals))
        optimum = brute_force(costs, errors, budget)
        solution = solve(costs, errors, budget, method="ilp")
        check_consistent(solution, costs, errors, budget)
        assert solution.error >= optimum - 1e-12
        if solution.exact:
            assert solution.error == pytest.approx(optimum, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_ties_break_deterministically(method: str):
    # identical choices: the lowest index; equal errors at different costs: the cheaper one
    solution = solve([[5, 5, 5], [9, 4, 4]], [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]], 100, method=method)
    assert solution.choices == (0, 1)


def test_infeasible_budget():
    with pytest.raises(
        QuantkitError, match=r"budget of 9 bytes is below the smallest possible allocation \(10 bytes\)"
    ):
        solve([[4, 8], [6, 7]], [[1.0, 0.0], [1.0, 0.0]], 9)


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_budget_at_minimum_takes_the_cheapest(method: str):
    costs = [[4096, 8192, 2048], [300, 100, 200], [7, 7]]
    errors = [[1.0, 0.5, 2.0], [0.1, 0.9, 0.3], [0.4, 0.2]]
    solution = solve(costs, errors, 2048 + 100 + 7, method=method)
    assert solution.choices == (2, 1, 1)
    assert solution.cost == 2048 + 100 + 7
    assert solution.error == pytest.approx(2.0 + 0.9 + 0.2)


@pytest.mark.parametrize("method", ["dp", "ilp"])
def test_huge_budget_takes_the_least_error(method: str):
    costs = [[4096, 8192, 2048], [300, 100, 200], [7, 9]]
    errors = [[1.0, 0.5, 2.0], [0.1, 0.9, 0.3], [0.4, 0.2]]
    solution = solve(costs, errors, 10**15, method=method)
    assert (solution.choices, solution.exact) == ((1, 0, 1), True)
    assert solution.cost == 8192 + 300 + 9


def test_generous_budget_costs_no_table():
    costs = [[10**12, 2 * 10**12 + 1]] * 3
    solution = solve(costs, [[1.0, 0.0]] * 3, 10**18, method="dp", max_cells=12)
    assert solution.choices == (1, 1, 1)


def test_too_big_for_forced_dp():
    with pytest.raises(QuantkitError, match="max_cells"):
        solve(
            [[0, 1_000_003], [0, 999_999]], [[1.0, 0.0], [1.0, 0.0]], 1_500_000, method="dp", max_cells=1000
        )


@pytest.mark.parametrize(
    ("costs", "errors", "budget", "message"),
    [
        ([[1, 2], [3]], [[1.0, 0.0]], 10, "units"),
        ([[1, 2], [3]], [[1.0, 0.0], [1.0, 2.0]], 10, "unit 1 has 1 costs but 2 errors"),
        ([], [], 10, "no units"),
        ([[1], []], [[1.0], []], 10, "unit 1 has no choices"),
        ([[1, -2]], [[1.0, 0.0]], 10, "costs must be non-negative ints"),
        ([[1, 2.5]], [[1.0, 0.0]], 10, "costs must be non-negative ints"),
        ([[1, 2]], [[1.0, math.nan]], 10, "errors must be finite"),
        ([[1, 2]], [[math.inf, 0.0]], 10, "errors must be finite"),
        ([[1, 2]], [[1.0, 0.0]], 10.0, "budget must be an int"),
    ],
)
def test_bad_inputs(costs, errors, budget, message):
    with pytest.raises(QuantkitError, match=message):
        solve(costs, errors, budget)


def test_unknown_method():
    with pytest.raises(QuantkitError, match="'greedy'.*auto, dp, ilp"):
        solve([[1]], [[0.0]], 1, method="greedy")


def realistic_problem() -> tuple[list[list[int]], list[list[float]], int]:
    """30 SmolLM2-135M-like layers of 7 linears at 2/3/4/8 bits, group 128 with fp16 scale and zero."""
    rng = random.Random(0)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    costs, errors, weights = [], [], 0
    for _layer in range(30):
        for rows, cols in shapes:
            n = rows * cols
            weights += n
            sensitivity = rng.lognormvariate(0, 1)
            costs.append([n * bits // 8 + n // 128 * 4 for bits in (2, 3, 4, 8)])
            errors.append([sensitivity * n * 4.0**-bits * rng.uniform(0.9, 1.1) for bits in (2, 3, 4, 8)])
    return costs, errors, int(weights * 3.5 / 8)


def test_realistic_size_dp_is_fast_and_ilp_agrees():
    costs, errors, budget = realistic_problem()
    assert len(costs) == 210
    start = time.perf_counter()
    dp = solve(costs, errors, budget)
    assert time.perf_counter() - start < 2.0
    assert (dp.method, dp.exact) == ("dp", True)
    check_consistent(dp, costs, errors, budget)
    for row, choice in zip(costs, dp.choices):  # errors fall with bits, so no affordable upgrade is left
        assert choice == len(row) - 1 or budget - dp.cost < row[choice + 1] - row[choice]
    ilp = solve(costs, errors, budget, method="ilp")
    check_consistent(ilp, costs, errors, budget)
    assert ilp.error == pytest.approx(dp.error, rel=1e-9)
