"""Checks shared by the exporters to third-party formats: layers on a grid they hold, lossless dtypes."""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.schemes import QuantScheme


def grid_layers(quantized: dict[str, QuantizedTensor], format_name: str, floats: bool = True) -> dict[str, QuantizedTensor]:
    """The quantized layers, refusing any that is not on an integer grid (or an FP4 one, with ``floats``)."""
    allowed = (IntQuantizedTensor, FloatQuantizedTensor) if floats else (IntQuantizedTensor,)
    for name, qt in quantized.items():
        if not isinstance(qt, allowed):
            what = "integer-grid or FP4" if floats else "integer-grid"
            raise QuantkitError(f"{format_name} export supports only {what} weights; {name} is {qt.meta()['kind']}")
    if not quantized:
        raise QuantkitError(f"nothing to export as {format_name}: the model has no quantized layers")
    return quantized


def lossless_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` if that changes no value, else None."""
    cast = tensor.to(dtype)
    return cast if torch.equal(cast.to(tensor.dtype), tensor) else None


def sequential_g_idx(scheme: QuantScheme, in_features: int) -> torch.Tensor:
    """The group of each input column when groups are contiguous (no act-order)."""
    return (torch.arange(in_features) // scheme.group_columns(in_features)).to(torch.int32)
