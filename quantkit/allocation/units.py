"""Allocation units: the sets of linears that receive one bit width together (a linear, a group, a block)."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter

# linear: every linear on its own. group: linears reading the same input, which serving engines fuse into one
# matmul (q/k/v, gate/up) and which must then share one scheme. block: every linear of a decoder block.
GRANULARITIES = ("linear", "group", "block")


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]  # full linear names
    block: int  # index of the decoder block holding them


def make_units(adapter: ModelAdapter, num_blocks: int, granularity: str) -> list[Unit]:
    """The units of a model with ``num_blocks`` blocks, in execution order."""
    if granularity not in GRANULARITIES:
        raise QuantkitError(f"unknown allocation granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    units = []
    for i in range(num_blocks):
        prefix = f"{adapter.blocks}.{i}"
        if granularity == "block":
            units.append(Unit(prefix, tuple(f"{prefix}.{n}" for n in adapter.linear_names()), i))
            continue
        for group in adapter.groups:
            members = [group] if granularity == "group" else [(name,) for name in group]
            for names in members:
                layers = tuple(f"{prefix}.{n}" for n in names)
                units.append(Unit(layers[0] if len(layers) == 1 else f"{prefix}.{'+'.join(names)}", layers, i))
    return units
