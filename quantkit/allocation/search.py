"""EvoPress-style evolutionary search over allocations, and the random baseline.

An allocation is one choice index per unit, choices ordered by width. Offspring come from a few paired moves
(one unit up a level, one of the same size down a level); while a child is over the budget (widths 4 → 8
cost more than 3 → 2 frees), random other units go down a level; then the slack left under the budget is
filled by raising random units while they fit. No candidate ever exceeds the budget. Selection runs in stages on
growing random subsets of the calibration windows: the best few of each stage go on to the next, the parent
joins the last stage, and the winner becomes the next parent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from quantkit.errors import QuantkitError
from quantkit.progress import progress_bar

Allocation = list[int]
# fitness(allocation, calibration window indices) -> loss (lower is better)
Fitness = Callable[[Allocation, Sequence[int]], float]


@dataclass(frozen=True)
class SearchBudget:
    """Generations, offspring per generation, and for each selection stage the survivors and windows used."""

    generations: int
    offspring: int
    survivors: tuple[int, ...]
    windows: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.generations < 0 or self.offspring < 1:
            raise QuantkitError(f"search needs generations >= 0 and offspring >= 1, got {self.generations}, {self.offspring}")
        if len(self.survivors) != len(self.windows) or not self.survivors or self.survivors[-1] != 1:
            raise QuantkitError("search stages need one survivor count per window count, ending with 1 survivor")
        if any(s < 1 for s in self.survivors) or any(w < 1 for w in self.windows):
            raise QuantkitError("search survivors and windows must be positive")


class BudgetedMoves:
    """Moves between allocations that never exceed ``budget`` bytes (costs per unit and choice)."""

    def __init__(self, costs: Sequence[Sequence[int]], budget: int, sizes: Sequence[int], rng: random.Random) -> None:
        self.costs, self.budget, self.rng = costs, budget, rng
        self.by_size: dict[int, list[int]] = {}
        for unit, size in enumerate(sizes):
            self.by_size.setdefault(size, []).append(unit)
        self.sizes = sizes

    def cost(self, allocation: Allocation) -> int:
        return sum(self.costs[u][c] for u, c in enumerate(allocation))

    def fill(self, allocation: Allocation) -> Allocation:
        """Raise random units one level at a time while the budget allows."""
        filled, spent = list(allocation), self.cost(allocation)
        raised = True
        while raised:
            raised = False
            for unit in self.rng.sample(range(len(filled)), len(filled)):
                level = filled[unit]
                if level + 1 < len(self.costs[unit]):
                    extra = self.costs[unit][level + 1] - self.costs[unit][level]
                    if spent + extra <= self.budget:
                        filled[unit], spent, raised = level + 1, spent + extra, True
        return filled

    def mutate(self, parent: Allocation, tries: int = 64) -> Allocation | None:
        """A different allocation within the budget: 1–3 paired moves (a unit up one level, one of the same
        size down one level), random units down one level while over the budget (a raise may cost several
        lowerings when widths are unevenly spaced), then fill."""
        for _ in range(tries):
            child, raised = list(parent), set()
            for _ in range(min(self.rng.randint(1, 3), self.rng.randint(1, 3))):
                ups = [u for u, c in enumerate(child) if c + 1 < len(self.costs[u])]
                if not ups:
                    break
                up = self.rng.choice(ups)
                child[up] += 1
                raised.add(up)
                peers = [u for u in self.by_size[self.sizes[up]] if u not in raised and child[u] > 0]
                if peers:
                    child[self.rng.choice(peers)] -= 1
            while self.cost(child) > self.budget:
                downs = [u for u, c in enumerate(child) if u not in raised and c > 0]
                if not downs:
                    break
                child[self.rng.choice(downs)] -= 1
            if child != parent and self.cost(child) <= self.budget:
                child = self.fill(child)
                if child != parent:
                    return child
        return None


def random_allocation(moves: BudgetedMoves) -> Allocation:
    """Every unit at its cheapest choice, then random raises while the budget allows."""
    return moves.fill([row.index(min(row)) for row in moves.costs])


def evolve(start: Allocation, moves: BudgetedMoves, fitness: Fitness, budget: SearchBudget, windows: int,
           rng: random.Random) -> tuple[Allocation, list[float]]:
    """Search from ``start``; returns the best allocation and the parent's fitness (last stage) per generation."""
    parent, history = list(start), []
    with progress_bar() as progress:
        task = progress.add_task("search", total=budget.generations)
        for generation in range(budget.generations):
            children: list[Allocation] = []
            for _ in range(budget.offspring):
                child = moves.mutate(parent)
                if child is not None and child not in children:
                    children.append(child)
            candidates = children or [parent]
            for stage, (keep, count) in enumerate(zip(budget.survivors, budget.windows)):
                if stage == len(budget.survivors) - 1 and parent not in candidates:
                    candidates = [*candidates, parent]
                subset = rng.sample(range(windows), min(count, windows))
                scored = sorted(((fitness(c, subset), i) for i, c in enumerate(candidates)))
                last = scored
                candidates = [candidates[i] for _, i in scored[:keep]]
            parent = candidates[0]
            history.append(last[0][0])
            progress.update(task, advance=1, description=f"search gen {generation + 1}: KL {last[0][0]:.4f}")
    return parent, history
