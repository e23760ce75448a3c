"""An allocation plan: the bit width of every quantized linear, how it was chosen, and what it costs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from torch import nn

from quantkit.allocation.costs import LayerCost, bits_per_weight, budget_bytes, check_target
from quantkit.allocation.options import check_bit_choices
from quantkit.errors import QuantkitError
from quantkit.export.atomic import write_json
from quantkit.models.adapters import ModelAdapter
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme

PLAN_VERSION = 1


@dataclass
class UnitRecord:
    """One allocation unit: its linears, the width chosen, and what was measured about it."""

    name: str
    layers: list[str]
    bits: int
    weights: int
    nbytes: int
    scores: dict[str, float | list[float]] = field(default_factory=dict)  # score name -> value or per choice


@dataclass
class AllocationPlan:
    """Every unit's width under a target of average bits per weight, with the budget in bytes it met."""

    target_bits: float
    bit_choices: list[int]
    granularity: str
    strategy: str
    score: str | None
    budget_bytes: int
    units: list[UnitRecord]
    search_history: list[float] = field(default_factory=list)  # best KL per generation
    base: dict = field(default_factory=dict)  # the scheme the widths apply to (group size, symmetry, format)
    layout: str = "native"  # whose bytes the budget counts

    @property
    def layer_bits(self) -> dict[str, int]:
        return {layer: unit.bits for unit in self.units for layer in unit.layers}

    @property
    def weights(self) -> int:
        return sum(unit.weights for unit in self.units)

    @property
    def nbytes(self) -> int:
        return sum(unit.nbytes for unit in self.units)

    @property
    def bits_per_weight(self) -> float:
        """Average bits per quantized weight written, as planned."""
        return bits_per_weight(self.nbytes, self.weights)

    def scheme_for(self, base: QuantScheme) -> Callable[[str], QuantScheme]:
        """``scheme_for(layer)``: ``base`` at the layer's planned width."""
        bits = self.layer_bits
        return lambda layer: replace(base, bits=bits[layer])

    def summary(self) -> dict:
        """The record stored in a checkpoint's ``quantization_config`` (per-layer schemes are in ``layers``)."""
        return {"target_bits": self.target_bits, "bit_choices": self.bit_choices, "granularity": self.granularity,
                "strategy": self.strategy, "score": self.score, "bits_per_weight": self.bits_per_weight,
                "layer_bits": self.layer_bits}

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, **asdict(self), "bits_per_weight": self.bits_per_weight}

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> AllocationPlan:
        """Rebuild a saved plan, refusing anything malformed with a one-line error naming ``source``."""
        try:
            if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
                raise ValueError(f"not a version-{PLAN_VERSION} allocation plan")
            units = [_unit(unit) for unit in data["units"]]
            plan = cls(float(data["target_bits"]), [int(b) for b in data["bit_choices"]], str(data["granularity"]),
                       str(data["strategy"]), data.get("score"), int(data["budget_bytes"]), units,
                       [float(x) for x in data.get("search_history", [])], dict(data.get("base") or {}),
                       str(data.get("layout", "native")))
            check_target(plan.target_bits)
            check_bit_choices(plan.bit_choices)
        except KeyError as exc:
            raise QuantkitError(f"invalid allocation {source}: missing field {exc}") from None
        except (TypeError, ValueError, QuantkitError) as exc:
            raise QuantkitError(f"invalid allocation {source}: {exc}") from None
        for unit in plan.units:
            if unit.bits not in plan.bit_choices or not unit.layers:
                raise QuantkitError(f"invalid allocation {source}: unit {unit.name} has bits {unit.bits} "
                                    f"(choices {plan.bit_choices}) and {len(unit.layers)} layers")
        return plan

    @classmethod
    def load(cls, path: Path) -> AllocationPlan:
        if not path.is_file():
            raise QuantkitError(f"allocation plan not found: {path}")
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise QuantkitError(f"allocation plan {path} is not valid JSON: {exc}") from None
        return cls.from_dict(data, str(path))


def _unit(data: dict) -> UnitRecord:
    """A unit record with its fields typed (a ``TypeError``/``KeyError`` names what is wrong)."""
    return UnitRecord(str(data["name"]), [str(layer) for layer in data["layers"]], int(data["bits"]),
                      int(data["weights"]), int(data["nbytes"]), dict(data.get("scores") or {}))


def check_plan(plan: AllocationPlan, model: nn.Module, adapter: ModelAdapter, quantizer: Quantizer, base: QuantScheme,
               cost: LayerCost, extra_bytes: dict[str, int]) -> None:
    """Refuse a plan made for another scheme, one that does not name exactly the model's quantizable linears,
    or one whose widths of ``base`` would write more than its target bits per weight (for data-dependent
    formats, before their outliers: the written bytes are checked again after quantizing)."""
    scheme = {k: v for k, v in base.to_dict().items() if k != "bits"}
    if plan.base and plan.base != scheme:
        differs = next(k for k in scheme if plan.base.get(k) != scheme[k])
        raise QuantkitError(f"the allocation plan was made for {differs} {plan.base.get(differs)!r}, not "
                            f"{scheme[differs]!r}; pass the same scheme options")
    layer_bits = plan.layer_bits
    expected = adapter.quantizable_layers(model)
    missing = [layer for layer in expected if layer not in layer_bits]
    extra = [layer for layer in layer_bits if layer not in set(expected)]
    if missing or extra:
        name = (missing or extra)[0]
        raise QuantkitError(f"the allocation plan does not fit this model: {name} is "
                            f"{'missing from the plan' if missing else 'not a quantizable linear of the model'}")
    nbytes = weights = 0
    for layer, bits in layer_bits.items():
        linear = model.get_submodule(layer)
        shape = (linear.out_features, linear.in_features)
        nbytes += cost(quantizer.plan(replace(base, bits=bits)).meta(shape), shape) + extra_bytes.get(layer, 0)
        weights += shape[0] * shape[1]
    if nbytes > budget_bytes(plan.target_bits, weights):
        raise QuantkitError(f"the allocation plan writes {bits_per_weight(nbytes, weights):.4f} bits per weight with "
                            f"{base.format} groups of {base.group_size} in the {cost.layout} layout, over its target of "
                            f"{plan.target_bits}")
