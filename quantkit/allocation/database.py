"""The layer database: every linear quantized at every candidate bit width, with its layout and output error.

Built in one sequential engine pass (EvoPress's database): each block's Hessians are taken with the earlier
blocks quantized at the propagation width, every linear is quantized at each candidate from the same
statistics, and the propagation width's result is what the following layers see. The search then assembles
candidate models by swapping these weights in for a while, without quantizing again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from quantkit.engine import EngineOptions, quantize_model
from quantkit.engine.passes import swapped_weights
from quantkit.formats.base import QuantizedTensor
from quantkit.models.adapters import ModelAdapter
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.schemes import QuantScheme


@dataclass
class LayerChoices:
    """One linear at every candidate: dequantized weights, tensor metas (which fix the bytes written) and output
    NMSE on calibration data."""

    weights: list[torch.Tensor]
    metas: list[dict]
    nmse: list[float]


def output_nmse(weight: torch.Tensor, quantized: list[torch.Tensor], hessian: torch.Tensor | None) -> list[float]:
    """``||(W - Q) X||² / ||W X||²`` over the calibration inputs for each ``Q``, from their Hessian ``X Xᵀ``
    (float64); NaN without a Hessian."""
    if hessian is None:
        return [float("nan")] * len(quantized)
    w = weight.double()
    signal = float(((w @ hessian) * w).sum())
    errors = []
    for q in quantized:
        delta = w - q.double()
        errors.append(float(((delta @ hessian) * delta).sum()) / signal if signal > 0 else 0.0)
    return errors


@dataclass
class LayerDatabase:
    bits: tuple[int, ...]  # the candidate widths, one per choice index
    layers: dict[str, LayerChoices]

    def weights(self, assignment: dict[str, int]) -> dict[str, torch.Tensor]:
        """Each named linear's dequantized weight at its chosen index (to swap in with
        :func:`quantkit.engine.passes.swapped_weights`)."""
        return {layer: self.layers[layer].weights[choice] for layer, choice in assignment.items()}


def build_database(
    model: nn.Module,
    adapter: ModelAdapter,
    quantizer: Quantizer,
    schemes: list[QuantScheme],
    propagate: int,
    calib: torch.Tensor,
    weight_clip: dict[str, torch.Tensor] | None = None,
    clip_bits: int | None = None,
    true_sequential: bool = True,
) -> LayerDatabase:
    """Quantize every linear of ``model`` under each of ``schemes``; ``schemes[propagate]`` feeds later blocks.

    Learned clipping ratios (``weight_clip``, from a transform trained for ``clip_bits``-bit weights) apply
    at that width only. The model's weights are left as they were.
    """
    layers: dict[str, LayerChoices] = {}

    def quantize_all(name: str, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> QuantizedTensor:
        results = [quantizer.quantize(weight, stats if s.bits == clip_bits else replace(stats, clip=None), s)
                   for s in schemes]
        weights = [qt.dequantize(weight.dtype) for qt in results]
        layers[name] = LayerChoices(weights, [qt.meta() for qt in results], output_nmse(weight, weights, stats.hessian))
        return results[propagate]

    options = EngineOptions(true_sequential=true_sequential, weight_clip=weight_clip or {}, statistics=True,
                            quantize_layer=quantize_all)
    label = f"database {'/'.join(str(s.bits) for s in schemes)}-bit"
    working = {name: model.get_submodule(name).weight.data.clone() for name in adapter.quantizable_layers(model)}
    with swapped_weights(model, working):  # the engine quantizes copies in place
        quantize_model(model, adapter, quantizer, lambda _name: schemes[propagate], calib, options, label=label)
    return LayerDatabase(tuple(s.bits for s in schemes), layers)
