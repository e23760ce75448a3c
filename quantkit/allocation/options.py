"""What an allocation is asked for: the target, the widths, the strategy, the score, the unit, the search."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantkit import defaults
from quantkit.allocation.costs import check_target
from quantkit.allocation.search import SearchBudget
from quantkit.allocation.units import GRANULARITIES
from quantkit.errors import QuantkitError
from quantkit.schemes import SUPPORTED_BITS

STRATEGIES = ("auto", "solver", "ranked", "random")
SCORES = ("lim", "zd", "error", "kl")
DEFAULT_SCORE = {"auto": "kl", "solver": "kl", "ranked": "lim", "random": None}
# Minutes on a CPU for a ~100M-parameter model: 12 generations of 12 offspring, the best 3 on 1 window go on
# to 4 windows. EvoPress's own runs use 150 generations of 128 with 16/4/1 survivors on far more tokens.
CPU_SEARCH = SearchBudget(generations=12, offspring=12, survivors=(3, 1), windows=(1, 4))


def check_bit_choices(choices: Sequence[int]) -> None:
    """Refuse widths that are not distinct supported ones in increasing order."""
    if not choices or list(choices) != sorted(set(choices)) or any(b not in SUPPORTED_BITS for b in choices):
        raise QuantkitError(f"bit choices must be distinct widths from {', '.join(map(str, SUPPORTED_BITS))} in "
                            f"increasing order, got {','.join(map(str, choices))}")


@dataclass(frozen=True)
class AllocationOptions:
    """What to allocate: a target of average bits per quantized weight (as written) over ``bit_choices``."""

    target_bits: float
    bit_choices: tuple[int, ...] = defaults.BIT_CHOICES
    strategy: str = "auto"
    score: str | None = None  # None: the strategy's default
    granularity: str = "linear"
    search: SearchBudget = CPU_SEARCH
    kl_windows: int = 8  # calibration windows for KL measurements (of kl_seqlen tokens)
    kl_seqlen: int = 256
    score_windows: int = 1  # of them, used for each unit's KL score
    propagate_bits: int | None = None  # database: the width later blocks see (default: the nearest to the target)
    seed: int = defaults.SEED

    def __post_init__(self) -> None:
        check_target(self.target_bits)
        if self.strategy not in STRATEGIES:
            raise QuantkitError(f"unknown allocation strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.score is not None and self.score not in SCORES:
            raise QuantkitError(f"unknown allocation score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.strategy == "random" and self.score is not None:
            raise QuantkitError("the random allocation uses no score")
        if self.granularity not in GRANULARITIES:
            raise QuantkitError(f"unknown allocation granularity {self.granularity!r}; choose one of {', '.join(GRANULARITIES)}")
        check_bit_choices(self.bit_choices)
        if self.propagate_bits is not None and self.propagate_bits not in self.bit_choices:
            raise QuantkitError(f"the propagation width {self.propagate_bits} is not one of the bit choices")
        if min(self.kl_windows, self.kl_seqlen, self.score_windows) < 1 or self.score_windows > self.kl_windows:
            raise QuantkitError("KL windows, their length and the score windows must be positive (score ≤ KL windows)")

    @property
    def chosen_score(self) -> str | None:
        return self.score if self.score is not None else DEFAULT_SCORE[self.strategy]

    @property
    def scores(self) -> list[str]:
        """The scores to measure."""
        return [self.chosen_score] if self.chosen_score else []

    @property
    def needs_calibration(self) -> bool:
        return self.strategy == "auto" or self.chosen_score in ("error", "kl", "lim")

    @property
    def working_bits(self) -> int:
        """The propagation width asked for, else the width nearest the target: what the layer database
        propagates and what a transform is trained for."""
        return self.propagate_bits if self.propagate_bits is not None else nearest_width(self.bit_choices, self.target_bits)


def nearest_width(choices: Sequence[int], target_bits: float) -> int:
    """The width nearest an average-bits target (ties: the wider)."""
    return min(choices, key=lambda b: (abs(b - target_bits), -b))
