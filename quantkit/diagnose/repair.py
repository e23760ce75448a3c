"""Repair: the fewest units, taken in the attribution's order, to raise to more bits so that the quantized model
meets a KL or top-1 target, found by bisection; and the allocation plan that makes `quantkit quantize` write it."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantkit.allocation.costs import LayerCost, bits_per_weight, budget_bytes
from quantkit.allocation.kl import Divergence, KLMeter
from quantkit.allocation.plan import AllocationPlan, UnitRecord
from quantkit.allocation.units import Unit
from quantkit.diagnose.attribution import Attribution
from quantkit.engine.passes import swapped_weights
from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme

TARGET_METRICS = {"kl": "KL ≤", "top1": "top-1 agreement ≥"}


@dataclass(frozen=True)
class RepairTarget:
    """What a repair must reach on the held-out text: KL at most ``value`` (``kl``) or top-1 agreement with the
    float model at least ``value`` (``top1``)."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise QuantkitError(f"unknown repair target {self.metric!r}; choose one of {', '.join(TARGET_METRICS)}")
        upper = math.inf if self.metric == "kl" else 1.0
        if not (math.isfinite(self.value) and 0 <= self.value <= upper):
            raise QuantkitError(f"the {self.metric} target must be a number in [0, {upper:g}], got {self.value}")

    def met(self, divergence: Divergence) -> bool:
        return divergence.kl <= self.value if self.metric == "kl" else divergence.top1 >= self.value

    def __str__(self) -> str:
        return f"{TARGET_METRICS[self.metric]} {self.value:g}"


@dataclass
class Repair:
    """The units to raise (in attribution order), the divergence they leave, and every count bisection tried."""

    target: RepairTarget
    bits: int
    units: list[str]
    divergence: Divergence
    tried: dict[int, Divergence]

    def to_dict(self) -> dict:
        return {"target": {"metric": self.target.metric, "value": self.target.value}, "bits": self.bits,
                "count": len(self.units), "units": self.units,
                "kl": self.divergence.kl, "top1": self.divergence.top1,
                "tried": [{"count": k, "kl": d.kl, "top1": d.top1} for k, d in sorted(self.tried.items())]}


def find_repair(model: nn.Module, adapter: ModelAdapter, quantized: dict[str, torch.Tensor],
                raised: dict[str, torch.Tensor], attribution: Attribution, heldout: torch.Tensor,
                target: RepairTarget, bits: int) -> Repair:
    """The smallest count ``k`` such that the quantized model with the first ``k`` units of the repair order at
    their ``raised`` weights meets ``target`` on ``heldout``: bisection, taking the divergence as falling with
    ``k``. Refused when even every unit raised misses the target."""
    order = attribution.repair_order()
    with swapped_weights(model, quantized):
        meter = KLMeter(model, adapter, heldout, teacher=attribution.teacher)
        tried = {0: meter.measure(start_block=None)}

        def with_raised(count: int) -> Divergence:
            chosen = order[:count]
            with swapped_weights(model, {name: raised[name] for unit in chosen for name in unit.layers}):
                tried[count] = meter.measure(start_block=min(unit.block for unit in chosen))
            return tried[count]

        low, high = 0, len(order)
        if not target.met(tried[0]):
            if not target.met(with_raised(high)):
                left = tried[high]
                raise QuantkitError(f"even every unit at {bits} bits leaves KL {left.kl:.4g} and top-1 "
                                    f"{left.top1:.4g}, missing the target {target}")
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if target.met(with_raised(middle)) else (middle, high)
        else:
            high = 0
    return Repair(target, bits, [unit.name for unit in order[:high]], tried[high], tried)


def repair_plan(repair: Repair, units: list[Unit], model: nn.Module, quantizer: Quantizer, base: QuantScheme,
                granularity: str, cost: LayerCost) -> tuple[AllocationPlan, int]:
    """The allocation plan of every unit at ``base``'s width except the repaired ones at the repair width (its
    target: the bits per weight it writes, rounded up at the 4th decimal), and the bytes the repair adds."""
    raised = set(repair.units)

    def unit_bytes(shapes: list[tuple[int, int]], bits: int) -> int:
        return sum(cost(quantizer.plan(replace(base, bits=bits)).meta(shape), shape) for shape in shapes)

    records, added = [], 0
    for unit in units:
        shapes = [(linear.out_features, linear.in_features) for linear in map(model.get_submodule, unit.layers)]
        bits = repair.bits if unit.name in raised else base.bits
        nbytes = unit_bytes(shapes, bits)
        added += nbytes - unit_bytes(shapes, base.bits) if unit.name in raised else 0
        records.append(UnitRecord(unit.name, list(unit.layers), bits, sum(o * i for o, i in shapes), nbytes))
    weights, nbytes = sum(r.weights for r in records), sum(r.nbytes for r in records)
    target = math.ceil(bits_per_weight(nbytes, weights) * 10**4) / 10**4
    plan = AllocationPlan(target, sorted({base.bits, repair.bits}), granularity, "repair", "kl",
                          budget_bytes(target, weights), records,
                          base={k: v for k, v in base.to_dict().items() if k != "bits"}, layout=cost.layout)
    return plan, added
