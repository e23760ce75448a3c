"""The native checkpoint: packed quantized tensors plus untouched float tensors, self-described in config.json."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantkit.export.atomic import atomic_directory
from quantkit.export.safetensors_io import write_shards
from quantkit.formats.base import QuantizedTensor

QUANT_METHOD = "quantkit"
FORMAT_NAME = "native"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers, each stored once: a tied tensor keeps its first name."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        state[name] = tensor
    return state


def checkpoint_tensors(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint: packed tensors for quantized linears, the rest as they are."""
    tensors = {name: t.detach() for name, t in unique_state(model).items() if name.removesuffix(".weight") not in quantized}
    for layer, qt in quantized.items():
        tensors.update({f"{layer}.{name}": t for name, t in qt.to_tensors().items()})
    return tensors


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
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **quantization_config,
        "layers": {name: {**qt.meta(), "shape": list(qt.shape)} for name, qt in quantized.items()},
    }
    with atomic_directory(output, overwrite) as staging:
        write_shards(checkpoint_tensors(model, quantized), staging, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        for filename, payload in (extra_json or {}).items():
            (staging / filename).write_text(json.dumps(payload, indent=2) + "\n")
