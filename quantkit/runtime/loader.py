"""Loading a quantkit checkpoint: validate every tensor against the config, then build the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.export.native import FORMAT_NAME, FORMAT_VERSION, QUANT_METHOD, unique_state
from quantkit.export.safetensors_io import SAFETENSORS_DTYPES, header_specs, read_tensors, shard_map
from quantkit.models.adapters import adapter_for
from quantkit.runtime.quant_linear import QuantLinear


def read_checkpoint_config(folder: Path) -> tuple[dict, dict]:
    """``(model config without quantization_config, quantization_config)`` of a quantkit checkpoint."""
    if not folder.is_dir():
        raise QuantkitError(f"checkpoint not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise QuantkitError(f"{folder} is not a checkpoint: no config.json")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise QuantkitError(f"corrupt config.json in {folder}: {exc}") from None
    qc = config.pop("quantization_config", None) if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise QuantkitError(f"{folder} is not a quantkit checkpoint (config.json has no quantkit quantization_config)")
    if qc.get("format") != FORMAT_NAME or int(qc.get("format_version", 0)) > FORMAT_VERSION:
        raise QuantkitError(f"unsupported checkpoint format {qc.get('format')} v{qc.get('format_version')}")
    if not isinstance(qc.get("layers"), dict):
        raise QuantkitError(f"corrupt quantization_config in {folder}: no per-layer table")
    return config, qc


def is_quantkit_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` claims to be a quantkit checkpoint (its config names quantkit); not a validation."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _skeleton(config_dict: dict) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.get("model_type")
    adapter_for(str(model_type))
    try:
        config = AutoConfig.for_model(**config_dict)
        dtype = getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - transformers validates configs with several exception types
        raise QuantkitError(f"invalid model config in checkpoint: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    model.tie_weights()  # empty-weight construction skips tying; tied tensors are stored once
    return model


def _swap_in_quant_linears(model: nn.Module, layers: dict[str, dict]) -> None:
    for name, meta in layers.items():
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise QuantkitError(f"checkpoint names layer {name}, which the model does not have") from None
        if not isinstance(linear, nn.Linear) or not isinstance(meta, dict) or "kind" not in meta:
            raise QuantkitError(f"checkpoint entry for {name} does not describe a quantized linear layer")
        if meta.get("shape", [linear.out_features, linear.in_features]) != [linear.out_features, linear.in_features]:
            raise QuantkitError(f"checkpoint records shape {meta['shape']} for {name}, the model has "
                                f"{[linear.out_features, linear.in_features]}")
        parent_name, _, child = name.rpartition(".")
        try:
            quant = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, meta, linear.weight.dtype)
        except (KeyError, TypeError, ValueError) as exc:
            raise QuantkitError(f"checkpoint entry for {name} is incomplete or invalid: {exc!r}") from None
        setattr(model.get_submodule(parent_name), child, quant)


def _validate(folder: Path, expected: dict[str, torch.Tensor], files: dict[str, str]) -> None:
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise QuantkitError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unexpected:
        raise QuantkitError(f"checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    specs: dict[str, tuple[tuple[int, ...], str]] = {}
    for shard in sorted(set(files.values())):
        specs.update(header_specs(folder / shard))
    for name, tensor in expected.items():
        if name not in specs:
            raise QuantkitError(f"tensor {name} is not in {files[name]} although the index says so")
        shape, dtype = specs[name]
        want = (tuple(tensor.shape), SAFETENSORS_DTYPES.get(tensor.dtype, str(tensor.dtype)))
        if (shape, dtype) != want:
            raise QuantkitError(f"tensor {name} has shape {list(shape)} {dtype}, expected {list(want[0])} {want[1]}")


def load(path: str | Path) -> nn.Module:
    """Load a quantkit checkpoint as a transformers model whose quantized linears are QuantLinear modules."""
    folder = Path(path)
    config_dict, qc = read_checkpoint_config(folder)
    model = _skeleton(config_dict)
    _swap_in_quant_linears(model, qc["layers"])
    expected = unique_state(model)
    files = shard_map(folder)
    _validate(folder, expected, files)
    tensors = read_tensors(folder, files)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise QuantkitError(f"tensor {name} contains NaN or infinite values")
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise QuantkitError(f"checkpoint left {leftover[0]} without a value")
    for layer in qc["layers"]:
        model.get_submodule(layer).quantized()  # decode once: refuses out-of-range group indices early
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """The tokenizer saved next to a checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
