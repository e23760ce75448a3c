"""Linears that share an input (q/k/v, gate/up) run as one matmul where their weights allow it, and single
linears without their module's dispatch.

Fusion never copies a model: float linears get one weight whose row blocks become their own weights (views),
and quantized ones served by the C kernels' int8 tiles get one stack of tiles that each layer then reads
through views (:func:`quantkit_kernels.cpu_int.fuse_tiles`, decode batches only). Layers that do not fit
(other kernels, input transforms or activation quantization, mixed shapes) run one by one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.runtime.quant_linear import QuantLinear

Matmul = Callable[[torch.Tensor], torch.Tensor]


def _fuse_dense(layers: list[nn.Module]) -> Matmul | None:
    """One weight for float ``nn.Linear`` layers of one input size and dtype; theirs become views of it."""
    if not all(type(layer) is nn.Linear for layer in layers):
        return None
    first = layers[0].weight
    if not all(layer.weight.dtype == first.dtype and layer.weight.device == first.device
               and layer.in_features == layers[0].in_features for layer in layers):
        return None
    if len(layers) == 1:  # nothing to fuse: the call without the module's dispatch
        weight, bias = layers[0].weight, layers[0].bias
        return lambda x: F.linear(x, weight, bias)
    weight = torch.cat([layer.weight.detach() for layer in layers])
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias.detach() if layer.bias is not None else weight.new_zeros(layer.out_features)
                          for layer in layers])
    row = 0
    for layer in layers:
        rows = slice(row, row + layer.out_features)
        layer.weight = nn.Parameter(weight[rows], requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(bias[rows], requires_grad=False)
        row += layer.out_features
    return lambda x: F.linear(x, weight, bias)


def _fuse_tiled(layers: list[nn.Module], dtype: torch.dtype) -> Matmul | None:
    """One call for QuantLinear layers whose CPU kernels decode from int8 tiles (see the module docstring)."""
    from quantkit_kernels.cpu_int import fuse_tiles

    if not all(isinstance(layer, QuantLinear) and layer.plain_input and layer.stored_device.type == "cpu"
               for layer in layers):
        return None
    cpu = torch.device("cpu")
    fused = fuse_tiles([layer.kernel(cpu, dtype) for layer in layers])
    if fused is None:
        return None
    biases = [layer.bias for layer in layers]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.float() if b is not None else torch.zeros(layer.out_features) for b, layer in zip(biases, layers)])

    def run(x: torch.Tensor) -> torch.Tensor:
        y = fused.product(x)
        return (y if bias is None else y + bias).to(x.dtype)

    return run


class Projections:
    """Linears of one input (activations of ``dtype``): ``projections(x)`` is the tuple of their outputs, from
    one fused matmul where :func:`_fuse_dense` or :func:`_fuse_tiled` built one (the tiled one for up to
    ``GEMV_MAX_ROWS`` rows)."""

    def __init__(self, layers: list[nn.Module], dtype: torch.dtype) -> None:
        from quantkit_kernels.cpu_int import GEMV_MAX_ROWS

        self.layers = layers
        self.sizes = [layer.out_features for layer in layers]
        self.fused, self.max_rows = _fuse_dense(layers), None
        if self.fused is None:
            self.fused, self.max_rows = _fuse_tiled(layers, dtype), GEMV_MAX_ROWS

    @property
    def is_fused(self) -> bool:
        """Whether the layers run as one call (for decode batches at least)."""
        return self.fused is not None

    def _fits(self, x: torch.Tensor) -> bool:
        return self.fused is not None and (self.max_rows is None or x.shape[0] <= self.max_rows)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._fits(x):
            return self.fused(x).split(self.sizes, dim=-1)
        return tuple(layer(x) for layer in self.layers)

    def joint(self, x: torch.Tensor) -> torch.Tensor:
        """The outputs side by side, ``[rows, sum of out_features]``."""
        return self.fused(x) if self._fits(x) else torch.cat(self(x), dim=-1)
