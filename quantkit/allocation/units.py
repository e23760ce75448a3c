"""Allocation units: the sets of linears that receive one bit width together (a linear, a group, a block)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter

# linear: every linear on its own. group: linears reading the same input, which serving engines fuse into one
# matmul (q/k/v, gate/up) and which must then share one scheme, and each routed expert whole. block: every linear
# of a decoder block.
GRANULARITIES = ("linear", "group", "block")


@dataclass(frozen=True)
class Unit:
    name: str
    layers: tuple[str, ...]  # full linear names
    block: int  # index of the decoder block holding them


def make_units(adapter: ModelAdapter, blocks: Sequence[nn.Module], granularity: str) -> list[Unit]:
    """The units of a model whose decoder ``blocks`` are these, in execution order."""
    if granularity not in GRANULARITIES:
        raise QuantkitError(f"unknown allocation granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    units = []
    for i, block in enumerate(blocks):
        prefix = f"{adapter.blocks}.{i}"
        if granularity == "block":
            units.append(Unit(prefix, tuple(f"{prefix}.{n}" for n in adapter.block_linear_names(block)), i))
            continue
        named = [("+".join(group), group) for group in adapter.block_groups(block)]
        named += [(expert[0].rpartition(".")[0], expert) for expert in adapter.expert_groups(block)]
        for group_name, group in named:
            if granularity == "group":
                units.append(Unit(f"{prefix}.{group_name}", tuple(f"{prefix}.{n}" for n in group), i))
            else:
                units += [Unit(f"{prefix}.{n}", (f"{prefix}.{n}",), i) for n in group]
    return units
