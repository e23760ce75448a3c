"""The native checkpoint: packed quantized tensors plus untouched float tensors, self-described in config.json."""

from __future__ import annotations

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
from quantkit.formats.base import QuantizedTensor

QUANT_METHOD = "quantkit"
FORMAT_NAME = "native"
FORMAT_VERSION = 1

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "FORMAT_NAME", "FORMAT_VERSION", "QUANT_METHOD", "checkpoint_tensors",
           "layer_records", "native_config", "save_native", "unique_state"]


def checkpoint_tensors(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: packed tensors for quantized linears, the rest as they are."""
    tensors = plain_tensors(model, quantized)
    for layer, qt in quantized.items():
        tensors.update({f"{layer}.{name}": t for name, t in qt.to_tensors().items()})
    return tensors


def layer_records(quantized: dict[str, QuantizedTensor]) -> dict[str, dict]:
    """The per-layer table of config.json: each quantized layer's meta and shape."""
    return {name: {**qt.meta(), "shape": list(qt.shape)} for name, qt in quantized.items()}


def native_config(model: nn.Module, layers: dict[str, dict], quantization_config: dict) -> dict:
    """config.json of a native checkpoint: the model's config with its ``quantization_config``."""
    config = model_config_dict(model)
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
) -> None:
    """Write the checkpoint atomically: nothing appears at ``output`` unless every file was written."""
    config = native_config(model, layer_records(quantized), quantization_config)
    write_checkpoint(output, model, tokenizer, checkpoint_tensors(model, quantized), config, overwrite,
                     max_shard_bytes, extra_json)
