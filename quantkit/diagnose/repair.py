"""Repair: the fewest units, taken in the attribution's order, to raise to more bits so that the quantized model
meets a KL target, found by bisection; and the allocation plan that makes `quantkit quantize` write it."""

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


@dataclass
class Repair:
    """The units to raise (in attribution order), the divergence they leave, and every count bisection tried."""

    target_kl: float
    bits: int
    units: list[str]
    divergence: Divergence
    tried: dict[int, Divergence]

    def to_dict(self) -> dict:
        return {"target_kl": self.target_kl, "bits": self.bits, "count": len(self.units), "units": self.units,
                "kl": self.divergence.kl, "top1": self.divergence.top1,
                "tried": [{"count": k, "kl": d.kl, "top1": d.top1} for k, d in sorted(self.tried.items())]}


def find_repair(model: nn.Module, adapter: ModelAdapter, quantized: dict[str, torch.Tensor],
                raised: dict[str, torch.Tensor], attribution: Attribution, heldout: torch.Tensor, target_kl: float,
                bits: int) -> Repair:
    """The smallest count ``k`` such that the quantized model with the first ``k`` units of the repair order at
    their ``raised`` weights has KL at most ``target_kl`` on ``heldout``: bisection, taking KL as falling with
    ``k``. Refused when even every unit raised misses the target."""
    if not (math.isfinite(target_kl) and target_kl >= 0):
        raise QuantkitError(f"the KL target must be a non-negative number, got {target_kl}")
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
        if tried[0].kl > target_kl:
            if with_raised(high).kl > target_kl:
                raise QuantkitError(f"even every unit at {bits} bits leaves KL {tried[high].kl:.4g}, above the "
                                    f"target {target_kl:g}")
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (low, middle) if with_raised(middle).kl <= target_kl else (middle, high)
        else:
            high = 0
    return Repair(target_kl, bits, [unit.name for unit in order[:high]], tried[high], tried)


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
