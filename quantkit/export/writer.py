"""What every checkpoint format shares: the tensors kept as they are, and the atomic directory write."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantkit.actquant import INPUT_SCALE
from quantkit.export.atomic import atomic_directory
from quantkit.export.safetensors_io import write_shards
from quantkit.formats.kron import TRANSFORM_BUFFERS
from quantkit.kvcache import KV_SCALES
from quantkit.layouts.common import unique_state

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# What a quantized layer stores besides its weight's tensors and its bias, always in float32: the online input
# map's factors and the static activation scale.
LAYER_BUFFERS = (*TRANSFORM_BUFFERS, INPUT_SCALE)
FLOAT32_BUFFERS = (*LAYER_BUFFERS, *KV_SCALES)  # never cast to the checkpoint's dtype


def plain_tensors(model: nn.Module, quantized_layers, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every stored tensor that is not part of a quantized layer's weight (a quantized layer keeps its bias and
    its :data:`LAYER_BUFFERS`); float ones in ``dtype`` when given, except :data:`FLOAT32_BUFFERS` (the layer
    buffers and the KV-cache scales)."""
    layers = set(quantized_layers)
    tensors = {}
    for name, tensor in unique_state(model).items():
        module, _, leaf = name.rpartition(".")
        if module in layers and leaf != "bias" and leaf not in LAYER_BUFFERS:
            continue
        cast = dtype is not None and tensor.is_floating_point() and leaf not in FLOAT32_BUFFERS
        tensors[name] = tensor.detach().to(dtype) if cast else tensor.detach()
    return tensors


def model_config_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The model's config as a dict, without any quantization_config it was loaded with; recording ``dtype``
    as the dtype of its weights when given."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
        config.pop("torch_dtype", None)
    return config


def write_checkpoint(
    output: Path,
    model: nn.Module,
    tokenizer,
    tensors: dict[str, torch.Tensor],
    config: dict,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    extra_json: dict[str, dict] | None = None,
) -> None:
    """Write shards, config.json, generation config, tokenizer and extra JSON files; all or nothing, refused
    before anything is written when the tensors and JSON files do not fit."""
    needed = tensor_bytes(tensors) + sum(len(json.dumps(payload, indent=2)) + 1
                                         for payload in [config, *(extra_json or {}).values()])
    with atomic_directory(output, overwrite, needed, "the checkpoint") as staging:
        write_shards(tensors, staging, max_shard_bytes)
        write_side_files(staging, model, tokenizer, config, extra_json)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """What ``tensors`` take in safetensors files: their data and, roughly, their header entries."""
    return sum(t.numel() * t.element_size() + header_bytes(name) for name, t in tensors.items())


def estimated_bytes(model: nn.Module, layer_bytes: dict[str, int], dtype: torch.dtype) -> int:
    """What a checkpoint of ``model`` will take, known before it is quantized: each quantized layer's weight
    at the bytes ``layer_bytes`` gives it, every other tensor as stored (float ones in ``dtype``)."""
    total = 0
    for name, tensor in unique_state(model).items():
        module, _, leaf = name.rpartition(".")
        if module in layer_bytes and leaf == "weight":
            total += layer_bytes[module]
        else:
            total += tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
        total += header_bytes(name)
    return total


def header_bytes(name: str) -> int:
    """Roughly what a tensor named ``name`` takes in a safetensors header."""
    return len(name) + 64


def write_side_files(folder: Path, model: nn.Module, tokenizer, config: dict,
                     extra_json: dict[str, dict] | None = None) -> None:
    """Everything of a checkpoint but its tensors: config.json, generation config, tokenizer, extra JSON files."""
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    for filename, payload in (extra_json or {}).items():
        (folder / filename).write_text(json.dumps(payload, indent=2) + "\n")
