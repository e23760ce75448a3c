"""Writing a quantized model as a checkpoint in any layout: the layout encodes, this writes, atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from quantkit.actquant import INPUT_SCALE, InputQuantization
from quantkit.export.gguf_file import write_gguf
from quantkit.export.writer import DEFAULT_MAX_SHARD_BYTES, model_config_dict, plain_tensors, write_checkpoint
from quantkit.formats.base import QuantizedTensor
from quantkit.kvcache import KVCacheQuantization
from quantkit.layouts import get_layout
from quantkit.layouts.gguf_vocab import tokenizer_fields


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's input embeddings (what "model dtype" means for scales)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32


def checkpoint_config(model: nn.Module, quantization_config: dict, dtype: torch.dtype | None = None) -> dict:
    """config.json: the model's config (its weights in ``dtype`` when given) with ``quantization_config``."""
    return {**model_config_dict(model, dtype), "quantization_config": quantization_config}


def save_checkpoint(layout: str, output: Path, model: nn.Module, tokenizer, quantized: dict[str, QuantizedTensor],
                    quantization_config: dict, overwrite: bool = False,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype | None = None,
                    source_file: Path | None = None) -> None:
    """Write ``quantized`` (and the model's other tensors, float ones in ``dtype`` when given) at ``output`` in
    ``layout``, atomically; refused before anything is written when the layout cannot hold it. ``source_file``:
    the GGUF file the model came from, whose tokenizer keys a GGUF file copies."""
    writer = get_layout(layout)
    recorded = quantization_config.get("input_activations")
    inputs = None if recorded is None else InputQuantization.from_record(recorded)
    writer.check(activations=inputs, online=bool((quantization_config.get("transform") or {}).get("online")))
    writer.check(kinds=sorted({qt.kind for qt in quantized.values()}))
    if quantization_config.get("kv_cache") is not None:
        writer.check_kv_cache(KVCacheQuantization.from_record(quantization_config["kv_cache"]))
    encoded = writer.encode(model, quantized, quantization_config, dtype or writer.auto_dtype or model_dtype(model))
    if writer.single_file:
        write_gguf(output, encoded, tokenizer_fields(tokenizer, source_file), overwrite)
        return
    tensors = {**plain_tensors(model, quantized, dtype), **encoded.tensors}
    if inputs is not None and inputs.static is not None:
        tensors = stored_input_scales(tensors, *writer.stored_input_scale(inputs))
    write_checkpoint(output, model, tokenizer, tensors, checkpoint_config(model, encoded.quantization_config, dtype),
                     overwrite, max_shard_bytes, encoded.extra_json)


def stored_input_scales(tensors: dict[str, torch.Tensor], name: str, reciprocal: bool) -> dict[str, torch.Tensor]:
    """``tensors`` with every layer's static ``input_scale`` stored as the layout's ``name`` (its reciprocal
    when the layout stores a divisor)."""
    stored = {}
    for key, tensor in tensors.items():
        layer, _, leaf = key.rpartition(".")
        if leaf == INPUT_SCALE:
            key, tensor = f"{layer}.{name}", (1 / tensor if reciprocal else tensor)
        stored[key] = tensor
    return stored
