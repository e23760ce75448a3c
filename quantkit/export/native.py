"""The native checkpoint: packed quantized tensors plus untouched float tensors, self-described in config.json.

Format version 2 also stores, under each quantized linear's ``weight`` name, an empty placeholder tensor (shape
``(0,)``, no data). A reader that does not know quantkit's ``quant_method`` (plain ``transformers``, which then
skips the quantization config) finds a ``weight`` of the wrong shape there and refuses the checkpoint, instead of
initialising the missing weights at random; quantkit's loader expects the placeholders and drops them. Version 1
checkpoints (without them) are still read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quantkit.export.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    model_config_dict,
    plain_tensors,
    unique_state,
    write_checkpoint,
)
from quantkit.formats.base import QuantizedTensor, TensorSpec

QUANT_METHOD = "quantkit"
FORMAT_NAME = "native"
FORMAT_VERSION = 2
PLACEHOLDER_VERSION = 2  # the first format version with a placeholder per quantized linear

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "FORMAT_NAME", "FORMAT_VERSION", "QUANT_METHOD", "checkpoint_tensors",
           "layer_records", "native_config", "placeholder_specs", "save_native", "unique_state"]


def placeholder_specs(layers: Iterable[str], version: int = FORMAT_VERSION) -> dict[str, TensorSpec]:
    """The empty tensors a native checkpoint of format ``version`` stores in place of the quantized linears'
    weights: name -> (shape, dtype)."""
    if version < PLACEHOLDER_VERSION:
        return {}
    return {f"{layer}.weight": ((0,), torch.uint8) for layer in layers}


def checkpoint_tensors(model: nn.Module, quantized: dict[str, QuantizedTensor],
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: packed tensors and a placeholder for quantized linears, the rest as they
    are (float ones in ``dtype`` when given)."""
    tensors = plain_tensors(model, quantized, dtype)
    for layer, qt in quantized.items():
        tensors.update({f"{layer}.{name}": t for name, t in qt.to_tensors().items()})
    tensors.update({name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in placeholder_specs(quantized).items()})
    return tensors


def layer_records(quantized: dict[str, QuantizedTensor]) -> dict[str, dict]:
    """The per-layer table of config.json: each quantized layer's meta and shape."""
    return {name: {**qt.meta(), "shape": list(qt.shape)} for name, qt in quantized.items()}


def native_config(model: nn.Module, layers: dict[str, dict], quantization_config: dict,
                  dtype: torch.dtype | None = None) -> dict:
    """config.json of a native checkpoint: the model's config (its weights in ``dtype`` when given) with its
    ``quantization_config``."""
    config = model_config_dict(model, dtype)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **quantization_config,
        "layers": layers,
    }
    return config


def save_native(
    output: Path,
    model: nn.Module,
    tokenizer,
    quantized: dict[str, QuantizedTensor],
    quantization_config: dict,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_json: dict[str, dict] | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write the checkpoint atomically: nothing appears at ``output`` unless every file was written. The float
    tensors kept as they are go in ``dtype`` when given."""
    config = native_config(model, layer_records(quantized), quantization_config, dtype)
    write_checkpoint(output, model, tokenizer, checkpoint_tensors(model, quantized, dtype), config, overwrite,
                     max_shard_bytes, extra_json)
