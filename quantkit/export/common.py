"""Checks shared by the exporters to third-party formats: one integer scheme per layer, lossless dtypes."""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor


def int_layers(quantized: dict[str, QuantizedTensor], format_name: str) -> dict[str, IntQuantizedTensor]:
    """The quantized layers, refusing any that is not on an integer grid."""
    for name, qt in quantized.items():
        if not isinstance(qt, IntQuantizedTensor) or qt.scheme.format != "int":
            raise QuantkitError(f"{format_name} export supports only integer-grid weights; {name} is {qt.meta()['kind']}")
    if not quantized:
        raise QuantkitError(f"nothing to export as {format_name}: the model has no quantized layers")
    return quantized  # type: ignore[return-value]


def lossless_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` if that changes no value, else None."""
    cast = tensor.to(dtype)
    return cast if torch.equal(cast.to(tensor.dtype), tensor) else None


def sequential_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """The group of each input column when groups are contiguous (no act-order)."""
    size = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // size).to(torch.int32)
