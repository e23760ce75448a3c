"""Choosing every linear's bit width under a budget of bytes written, from measurements already taken.

Strategies:

* ``solver``: the exact multiple-choice knapsack on per-unit errors for each choice (``error``: output NMSE
  from the layer database; ``kl``: end-to-end KL with only that unit quantized; ``lim``/``zd``: the unit's
  importance times ``4**-bits``, the noise power of a ``bits``-wide grid).
* ``auto``: the solver's answer (``kl`` unless another score is named), refined by the evolutionary search
  with end-to-end KL as fitness.
* ``ranked``: the layer-wise paper's method: every unit at the narrowest width whose uniform model exceeds
  the budget, then the least important units move one width down until it fits.
* ``random``: the narrowest width everywhere, then random units raised while they fit (a baseline).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from quantkit.allocation.costs import LayerCost
from quantkit.allocation.measure import Sensitivity, measure
from quantkit.allocation.options import AllocationOptions
from quantkit.allocation.plan import AllocationPlan, UnitRecord
from quantkit.allocation.search import Allocation, BudgetedMoves, evolve, random_allocation
from quantkit.allocation.solver import solve
from quantkit.engine.passes import swapped_weights
from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme


def ranked_allocation(importance: Sequence[float], costs: list[list[int]], budget: int) -> Allocation:
    """The layer-wise paper's allocation on the two adjacent widths around the budget."""
    levels = len(costs[0])
    uniform = [sum(row[level] for row in costs) for level in range(levels)]
    high = next((level for level in range(levels) if uniform[level] > budget), None)
    if high is None:
        return [levels - 1] * len(costs)
    allocation, spent = [high] * len(costs), uniform[high]
    for unit in sorted(range(len(costs)), key=lambda u: importance[u]):
        if spent <= budget:
            break
        if high > 0:
            allocation[unit] = high - 1
            spent -= costs[unit][high] - costs[unit][high - 1]
    if spent > budget:  # the narrower width costs more (SpQR's outliers): no ranking fits
        raise QuantkitError("the ranked allocation cannot meet this target with these widths; use --allocation solver")
    return allocation


def choose(sens: Sensitivity, model: nn.Module, options: AllocationOptions) -> AllocationPlan:
    """The plan of ``options``' strategy and score at its target, from measurements already taken."""
    budget = sens.budget(options.target_bits)
    score = options.chosen_score
    rng = random.Random(options.seed)
    moves = BudgetedMoves(sens.costs, budget, sens.weights, rng)
    history: list[float] = []
    if options.strategy == "random":
        allocation = random_allocation(moves)
    else:
        errors, importance = sens.errors(score)
        allocation = (ranked_allocation(importance, sens.costs, budget) if options.strategy == "ranked"
                      else list(solve(sens.costs, errors, budget).choices))
    if options.strategy == "auto":
        database, meter = sens.database, sens.meter
        if database is None or meter is None:
            raise QuantkitError("the search needs the layer database and the KL meter")

        def fitness(candidate: Allocation, windows: Sequence[int]) -> float:
            assignment = {layer: c for unit, c in zip(sens.units, candidate) for layer in unit.layers}
            with swapped_weights(model, database.weights(assignment)):
                return meter(windows)

        allocation, history = evolve(allocation, moves, fitness, options.search, options.kl_windows, rng)
    records = [
        UnitRecord(unit.name, list(unit.layers), options.bit_choices[choice], sens.weights[u], sens.costs[u][choice],
                   {name: values[u] for name, values in sens.scores.items()})
        for u, (unit, choice) in enumerate(zip(sens.units, allocation))
    ]
    return AllocationPlan(options.target_bits, list(options.bit_choices), options.granularity, options.strategy,
                          score, budget, records, history)


def plan_allocation(
    model: nn.Module,
    adapter: ModelAdapter,
    quantizer: Quantizer,
    base: QuantScheme,
    options: AllocationOptions,
    calib: torch.Tensor | None,
    cost: LayerCost | None = None,
    weight_clip: dict[str, torch.Tensor] | None = None,
    extra_bytes: dict[str, int] | None = None,
    true_sequential: bool = True,
) -> AllocationPlan:
    """Allocate ``options.bit_choices`` widths of ``base`` over the model's linears within the byte budget.

    Bytes are counted by ``cost`` (the checkpoint layout's); ``extra_bytes`` are written per layer whatever its
    width (a transform's online factors). The model's weights are left as they were.
    """
    sens = measure(model, adapter, quantizer, base, options, calib, options.scores, cost, weight_clip, extra_bytes,
                   true_sequential)
    plan = choose(sens, model, options)
    plan.base = {k: v for k, v in base.to_dict().items() if k != "bits"}
    plan.layout = (cost or LayerCost()).layout
    return plan
