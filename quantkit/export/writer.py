"""What every checkpoint format shares: the tensors kept as they are, and the atomic directory write."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantkit.export.atomic import atomic_directory
from quantkit.export.safetensors_io import write_shards
from quantkit.transforms.kron import TRANSFORM_BUFFERS

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


def plain_tensors(model: nn.Module, quantized_layers) -> dict[str, torch.Tensor]:
    """Every stored tensor that is not part of a quantized layer's weight (a quantized layer keeps its bias and
    its online input transform)."""
    layers = set(quantized_layers)
    tensors = {}
    for name, tensor in unique_state(model).items():
        module, _, leaf = name.rpartition(".")
        if module in layers and leaf != "bias" and leaf not in TRANSFORM_BUFFERS:
            continue
        tensors[name] = tensor.detach()
    return tensors


def model_config_dict(model: nn.Module) -> dict:
    """The model's config as a dict, without any quantization_config it was loaded with."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
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
    """Write shards, config.json, generation config, tokenizer and extra JSON files; all or nothing."""
    with atomic_directory(output, overwrite) as staging:
        write_shards(tensors, staging, max_shard_bytes)
        write_side_files(staging, model, tokenizer, config, extra_json)


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
