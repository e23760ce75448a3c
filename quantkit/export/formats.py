"""Choosing the checkpoint layout: native, GPTQ v1 or compressed-tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.export import compressed_tensors_format as ct
from quantkit.export import gptq_format as gptq
from quantkit.export.native import save_native
from quantkit.export.writer import DEFAULT_MAX_SHARD_BYTES, model_config_dict, plain_tensors, write_checkpoint
from quantkit.formats.base import QuantizedTensor
from quantkit.schemes import CHECKPOINT_LAYOUTS, QuantScheme

_LAYOUT_KINDS = {"gptq": ("int",), "compressed-tensors": ("int", "e2m1")}


def check_layout(name: str, scheme: QuantScheme | None = None, column_groups: bool = False, kind: str = "int",
                 activations: bool = False, online: bool = False) -> None:
    """Refuse an unknown layout, or a tensor kind, scheme, act-order grouping, activation quantization or
    online input transform it cannot express, before any long work."""
    if name not in CHECKPOINT_LAYOUTS:
        raise QuantkitError(f"unknown checkpoint layout {name!r}; choose one of {', '.join(CHECKPOINT_LAYOUTS)}")
    if name == "native":
        return
    if kind not in _LAYOUT_KINDS[name]:
        raise QuantkitError(f"the {name} layout cannot hold {kind} layers; use --layout native")
    if activations:
        raise QuantkitError(f"the {name} layout cannot record quantkit's dynamic activation quantization; "
                            "use --layout native")
    if online:
        raise QuantkitError(f"the {name} layout cannot hold a transform's online input maps; use --layout native")
    if scheme is not None and name == "gptq":
        gptq.check_scheme(scheme)
    if scheme is not None and name == "compressed-tensors":
        ct.check_scheme(scheme, column_groups)


def check_layers(name: str, scheme: QuantScheme, shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse layer shapes the layout cannot hold with ``scheme`` (compressed-tensors: whole groups)."""
    if name == "compressed-tensors":
        for layer, (_, in_features) in shapes.items():
            ct.check_layer(layer, scheme, in_features)


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's input embeddings (what "model dtype" means for scales)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def save_gptq(output: Path, model: nn.Module, tokenizer, quantized: dict[str, QuantizedTensor],
              quantization_config: dict, overwrite: bool = False,
              max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> None:
    """A GPTQ v1 checkpoint: config.json's quantization_config plus quantize_config.json."""
    qc = gptq.build_config(quantized, quantization_config, lm_head="lm_head" in quantized)
    tensors = {**plain_tensors(model, quantized, dtype), **gptq.layer_tensors(quantized)}
    config = {**model_config_dict(model, dtype), "quantization_config": qc}
    write_checkpoint(output, model, tokenizer, tensors, config, overwrite, max_shard_bytes, {gptq.CONFIG_FILE: qc})


def save_compressed_tensors(output: Path, model: nn.Module, tokenizer, quantized: dict[str, QuantizedTensor],
                            quantization_config: dict, overwrite: bool = False,
                            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> None:
    """A compressed-tensors checkpoint (pack-quantized, nvfp4- or mxfp4-pack-quantized per config group);
    integer scales in the model dtype (``dtype`` when given) when that is lossless."""
    qc = ct.build_config(quantized, model, quantization_config)
    tensors = {**plain_tensors(model, quantized, dtype), **ct.layer_tensors(quantized, dtype or model_dtype(model))}
    config = {**model_config_dict(model, dtype), "quantization_config": qc}
    write_checkpoint(output, model, tokenizer, tensors, config, overwrite, max_shard_bytes)


def save_checkpoint(layout: str, output: Path, model: nn.Module, tokenizer, quantized: dict[str, QuantizedTensor],
                    quantization_config: dict, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None) -> None:
    """Write ``quantized`` (and the model's other tensors, float ones in ``dtype`` when given) at ``output`` in
    ``layout``, atomically."""
    activations = quantization_config.get("input_activations") is not None
    online = bool((quantization_config.get("transform") or {}).get("online"))
    check_layout(layout, activations=activations, online=online)
    for kind in sorted({qt.kind for qt in quantized.values()}):
        check_layout(layout, kind=kind, activations=activations, online=online)
    writer = {"native": save_native, "gptq": save_gptq, "compressed-tensors": save_compressed_tensors}[layout]
    writer(output, model, tokenizer, quantized, quantization_config, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
           dtype=dtype)
