"""Measuring once what any target's allocation needs: bytes per unit and width, the layer database, the KL
meter, and the sensitivity scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantkit.allocation.costs import LayerCost, bits_per_weight, budget_bytes
from quantkit.allocation.database import LayerDatabase, build_database
from quantkit.allocation.kl import KLMeter
from quantkit.allocation.options import AllocationOptions
from quantkit.allocation.scores import lim_scores, zd_score
from quantkit.allocation.units import Unit, make_units
from quantkit.engine.passes import swapped_weights
from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter
from quantkit.progress import progress_bar
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme


@dataclass
class Sensitivity:
    """What is measured once and serves any target: units, their bytes per choice, the layer database,
    the KL meter and the scores per unit (``error``/``kl``: per choice; ``lim``/``zd``: one value)."""

    bit_choices: tuple[int, ...]
    units: list[Unit]
    weights: list[int]  # per unit
    costs: list[list[int]]  # per unit and choice, bytes written
    scores: dict[str, list]
    database: LayerDatabase | None = None
    meter: KLMeter | None = None

    def budget(self, target_bits: float) -> int:
        """The byte budget of ``target_bits``, refused when even the cheapest allocation exceeds it."""
        budget = budget_bytes(target_bits, sum(self.weights))
        cheapest = sum(min(row) for row in self.costs)
        if cheapest > budget:
            raise QuantkitError(
                f"an average of {target_bits} bits per weight is below the cheapest allocation of "
                f"{','.join(map(str, self.bit_choices))}-bit widths: "
                f"{bits_per_weight(cheapest, sum(self.weights)):.4f} bits per weight as written"
            )
        return budget

    def errors(self, score: str) -> tuple[list[list[float]], list[float]]:
        """The solver's error per unit and choice under ``score``, and an importance per unit."""
        if score in ("error", "kl"):
            table = self.scores[score]
            return table, [row[0] for row in table]
        importance = [1.0 + s if score == "lim" else s for s in self.scores[score]]  # LIM is -cos in [-1, 1]
        noise = [4.0 ** -bits for bits in self.bit_choices]
        return [[weight * n for n in noise] for weight in importance], importance


def layout_costs(model: nn.Module, units: list[Unit], quantizer: Quantizer, schemes: list[QuantScheme],
                 cost: LayerCost, extra_bytes: dict[str, int]) -> tuple[list[list[int]], list[int]]:
    """Bytes per unit and choice from the layout alone (a lower bound for data-dependent formats), and the
    weights per unit; refuses a scheme that does not fit a layer."""
    costs, weights = [], []
    for unit in units:
        row = [0] * len(schemes)
        count = 0
        for layer in unit.layers:
            linear = model.get_submodule(layer)
            shape = (linear.out_features, linear.in_features)
            count += shape[0] * shape[1]
            for c, scheme in enumerate(schemes):
                scheme.check_fits(layer, shape[1])
                row[c] += cost(quantizer.plan(scheme).meta(shape), shape) + extra_bytes.get(layer, 0)
        costs.append(row)
        weights.append(count)
    return costs, weights


def _kl_windows(calib: torch.Tensor, options: AllocationOptions) -> torch.Tensor:
    """``kl_windows`` random pieces of ``kl_seqlen`` tokens cut from the calibration windows."""
    length = options.kl_seqlen
    pieces = calib[:, : calib.shape[1] // length * length].reshape(-1, length)
    if pieces.shape[0] < options.kl_windows:
        raise QuantkitError(f"KL measurements need {options.kl_windows} pieces of {length} tokens; the calibration "
                            f"windows ({calib.shape[0]} × {calib.shape[1]}) hold {pieces.shape[0]}: raise --nsamples "
                            "or --seqlen")
    generator = torch.Generator().manual_seed(options.seed)
    return pieces[torch.randperm(pieces.shape[0], generator=generator)[: options.kl_windows]]


def _unit_kl(database: LayerDatabase, meter: KLMeter, model: nn.Module, units: list[Unit], windows: int) -> list[list[float]]:
    """KL of the model with one unit at each choice and the rest at full precision."""
    table = []
    with progress_bar() as progress:
        task = progress.add_task("KL per unit", total=len(units))
        for unit in units:
            row = []
            for choice in range(len(database.bits)):
                with swapped_weights(model, database.weights(dict.fromkeys(unit.layers, choice))):
                    row.append(meter(range(windows), start_block=unit.block))
            table.append(row)
            progress.advance(task)
    return table


def feasible(model: nn.Module, adapter: ModelAdapter, quantizer: Quantizer, base: QuantScheme,
             options: AllocationOptions, cost: LayerCost, extra_bytes: dict[str, int] | None = None) -> Sensitivity:
    """Units and their layout costs, after refusing (cheaply, before any measurement) a target that even the
    cheapest allocation exceeds."""
    schemes = [replace(base, bits=bits) for bits in options.bit_choices]
    for scheme in schemes:
        quantizer.check_scheme(scheme)
    units = make_units(adapter, adapter.get_blocks(model), options.granularity)
    costs, weights = layout_costs(model, units, quantizer, schemes, cost, extra_bytes or {})
    sens = Sensitivity(options.bit_choices, units, weights, costs, {})
    sens.budget(options.target_bits)
    return sens


def measure(
    model: nn.Module,
    adapter: ModelAdapter,
    quantizer: Quantizer,
    base: QuantScheme,
    options: AllocationOptions,
    calib: torch.Tensor | None,
    scores: Sequence[str],
    cost: LayerCost | None = None,
    weight_clip: dict[str, torch.Tensor] | None = None,
    extra_bytes: dict[str, int] | None = None,
    true_sequential: bool = True,
) -> Sensitivity:
    """Costs (bytes ``cost`` counts, default the native layout's) and the named ``scores`` for ``options``'
    choices and units, with the layer database and KL meter when a score, the search or data-dependent bytes
    need them. ``weight_clip`` (learned for ``options.working_bits``) applies at that width. The model's
    weights are left as they were."""
    cost = cost or LayerCost()
    extra_bytes = extra_bytes or {}
    sens = feasible(model, adapter, quantizer, base, options, cost, extra_bytes)
    schemes = [replace(base, bits=bits) for bits in options.bit_choices]
    units = sens.units
    wants_meter = options.strategy == "auto" or "kl" in scores
    wants_database = wants_meter or "error" in scores or quantizer.plan(base).data_dependent
    if (wants_database or "lim" in scores) and calib is None:
        raise QuantkitError(f"the {options.strategy} allocation with score {options.chosen_score} needs calibration data")
    if wants_database:
        sens.database = build_database(model, adapter, quantizer, schemes, options.bit_choices.index(options.working_bits),
                                       calib, weight_clip, options.working_bits, true_sequential)
        layers = sens.database.layers
        sens.costs = [[sum(cost(layers[layer].metas[c], tuple(layers[layer].weights[c].shape)) + extra_bytes.get(layer, 0)
                           for layer in unit.layers) for c in range(len(schemes))] for unit in units]
        sens.scores["error"] = [[sum(layers[layer].nmse[c] for layer in unit.layers) for c in range(len(schemes))]
                                for unit in units]
    if wants_meter:
        sens.meter = KLMeter(model, adapter, _kl_windows(calib, options))
    if "kl" in scores:
        sens.scores["kl"] = _unit_kl(sens.database, sens.meter, model, units, options.score_windows)
    if "lim" in scores:
        per_block = lim_scores(model, adapter, calib)
        sens.scores["lim"] = [per_block[unit.block] for unit in units]
    if "zd" in scores:
        sens.scores["zd"] = [zd_score([model.get_submodule(layer).weight for layer in unit.layers]) for unit in units]
    return sens
