"""Which quantized layers cause a quantized model's divergence from its float base.

Each unit (a linear, a group of linears, a block; :mod:`quantkit.allocation.units`) is measured two ways on
held-out windows, against the float model's next-token distributions: quantized **alone** in the float model,
and **restored** to float alone in the quantized model (what repairing it would gain). Each linear's relative
output error ``‖(W - Q) x‖² / ‖W x‖²`` is measured on calibration inputs of the float model.

Both models live in one module tree: the float model, whose linears take the checkpoint's dequantized weights
for as long as a measurement needs them (:func:`~quantkit.engine.passes.swapped_weights`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quantkit.allocation.kl import Divergence, KLMeter
from quantkit.allocation.units import Unit
from quantkit.engine.passes import swapped_weights
from quantkit.models.adapters import ModelAdapter
from quantkit.progress import progress_bar


@dataclass
class UnitAttribution:
    """What one unit does to the end-to-end divergence."""

    name: str
    block: int
    layers: list[str]
    weights: int
    kl_alone: float  # KL of the float model with only this unit quantized
    top1_alone: float
    kl_restored: float  # KL of the quantized model with only this unit in float
    top1_restored: float
    output_error: float  # relative output error on calibration inputs, over the unit's linears
    total_kl: float  # KL of the whole quantized model

    @property
    def gain(self) -> float:
        """How much KL restoring this unit to float removes (the repair order)."""
        return self.total_kl - self.kl_restored

    def to_dict(self) -> dict:
        return {**asdict(self), "gain": self.gain}


@dataclass
class Attribution:
    """The whole quantized model's divergence, and every unit's and block's share of it."""

    total: Divergence
    units: list[UnitAttribution]
    blocks: list[UnitAttribution]
    teacher: list[torch.Tensor]  # the float model's log-probabilities per held-out window

    def repair_order(self) -> list[UnitAttribution]:
        """Units by decreasing gain when restored (ties: the earlier unit first)."""
        return sorted(self.units, key=lambda unit: -unit.gain)


def output_errors(model: nn.Module, quantized: dict[str, torch.Tensor], batches: list[torch.Tensor]) -> dict[str, float]:
    """``‖(W - Q) x‖² / ‖W x‖²`` of every quantized linear, summed over the inputs the float model gives it on
    ``batches`` of token windows."""
    sums = {name: [0.0, 0.0] for name in quantized}

    def hook(name: str) -> Callable:
        weight = model.get_submodule(name).weight.float()
        error = weight - quantized[name]  # once per layer, not per batch

        def record(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            sums[name][0] += float((x @ error.t()).square().sum())
            sums[name][1] += float((x @ weight.t()).square().sum())

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in quantized]
    try:
        with torch.no_grad():
            for batch in batches:
                model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {name: num / den if den > 0 else 0.0 for name, (num, den) in sums.items()}


def attribute(model: nn.Module, adapter: ModelAdapter, quantized: dict[str, torch.Tensor], units: list[Unit],
              blocks: list[Unit], heldout: torch.Tensor, calibration: list[torch.Tensor]) -> Attribution:
    """Measure every unit and block (see the module docstring) of the float ``model`` against the dequantized
    ``quantized`` weights of its linears, on ``heldout`` windows ``[n, seqlen]`` and ``calibration`` batches."""
    errors = output_errors(model, quantized, calibration)
    floats = {name: model.get_submodule(name).weight.data for name in quantized}
    weights = {name: floats[name].numel() for name in quantized}
    every = units + blocks
    with progress_bar() as progress:
        task = progress.add_task("diagnose: layers quantized alone", total=2 * len(every) + 1)
        float_meter = KLMeter(model, adapter, heldout)
        alone = []
        for unit in every:
            with swapped_weights(model, {name: quantized[name] for name in unit.layers}):
                alone.append(float_meter.measure(start_block=unit.block))
            progress.advance(task)
        progress.update(task, description="diagnose: layers restored alone")
        with swapped_weights(model, quantized):  # the quantized model
            meter = KLMeter(model, adapter, heldout, teacher=float_meter.teacher)
            total = meter.measure(start_block=None)
            progress.advance(task)
            restored = []
            for unit in every:
                with swapped_weights(model, {name: floats[name] for name in unit.layers}):
                    restored.append(meter.measure(start_block=unit.block))
                progress.advance(task)
    records = []
    for unit, a, r in zip(every, alone, restored):
        count = sum(weights[name] for name in unit.layers)
        error = sum(errors[name] * weights[name] for name in unit.layers) / count
        records.append(UnitAttribution(unit.name, unit.block, list(unit.layers), count, a.kl, a.top1, r.kl, r.top1,
                                       error, total.kl))
    return Attribution(total, records[: len(units)], records[len(units):], float_meter.teacher)
