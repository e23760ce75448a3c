"""The exact bytes of a native checkpoint before it is written: its safetensors files from tensor shapes and
dtypes alone (the safetensors header rules), its index and its side files."""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quantkit.export.safetensors_io import INDEX_FILE, index_text, plan_shards, shard_names
from quantkit.export.save import checkpoint_config
from quantkit.export.writer import DEFAULT_MAX_SHARD_BYTES, plain_tensors, write_side_files
from quantkit.formats.base import TensorSpec, tensor_class
from quantkit.layouts.base import SAFETENSORS_DTYPES
from quantkit.layouts.native import native_quantization_config, placeholder_specs
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme

# The order the safetensors writer lays tensors out in: by dtype, in this order, then by name (the data offsets,
# and so the header's length, follow from it).
SAFETENSORS_ORDER = ("I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "I8", "U8", "BOOL")
METADATA = {"format": "pt"}  # what quantkit's shards record (export.safetensors_io.save_tensors)

Specs = dict[str, TensorSpec]


def safetensors_bytes(specs: Specs) -> int:
    """The size of the safetensors file :func:`quantkit.export.safetensors_io.save_tensors` writes for tensors of
    these shapes and dtypes: 8 bytes of header length, the JSON header padded to 8 bytes, the data."""
    header: dict[str, dict] = {"__metadata__": METADATA}
    offset = 0
    for name, (shape, dtype) in sorted(specs.items(), key=lambda item: (_rank(item[1][1]), item[0])):
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + length + (-length) % 8 + offset


def _rank(dtype: torch.dtype) -> int:
    return SAFETENSORS_ORDER.index(SAFETENSORS_DTYPES[dtype])


def _data_bytes(specs: Specs) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in specs.values())


def plain_specs(module: nn.Module, layers: list[str], dtype: torch.dtype, prefix: str = "") -> Specs:
    """What :func:`quantkit.export.writer.plain_tensors` stores of ``module`` (on any device, meta included)."""
    return {prefix + name: (tuple(t.shape), t.dtype) for name, t in plain_tensors(module, layers, dtype).items()}


def layer_specs(layers: dict[str, tuple[int, int]], quantizer: Quantizer,
                scheme_for: Callable[[str], QuantScheme]) -> tuple[Specs, dict[str, dict]]:
    """The quantized linears' stored tensors (and native placeholders) and their config records, by full name,
    from the tensor kind's contract (``expected_tensors``) with the planned meta."""
    specs: Specs = {}
    records: dict[str, dict] = {}
    for name, shape in layers.items():
        meta = quantizer.plan(scheme_for(name)).meta(shape)
        specs.update({f"{name}.{key}": spec for key, spec in tensor_class(meta["kind"]).expected_tensors(meta, shape).items()})
        records[name] = {**meta, "shape": list(shape)}
    specs.update(placeholder_specs(layers))
    return specs, records


def side_file_bytes(model: nn.Module, tokenizer, config: dict) -> dict[str, int]:
    """config.json, the generation config and the tokenizer's files, written to a scratch folder and measured."""
    with tempfile.TemporaryDirectory(prefix="quantkit-dry-run-") as scratch:
        write_side_files(Path(scratch), model, tokenizer, config)
        return {path.name: path.stat().st_size for path in sorted(Path(scratch).iterdir())}


def shard_file_bytes(shards: list[Specs]) -> dict[str, int]:
    """Shard file name -> bytes for tensors in these shards, with the index when there are several."""
    names = shard_names(len(shards))
    files = {name: safetensors_bytes(shard) for name, shard in zip(names, shards)}
    if len(shards) > 1:
        weight_map = dict(sorted((key, name) for name, shard in zip(names, shards) for key in shard))
        files[INDEX_FILE] = len(index_text(weight_map, sum(_data_bytes(shard) for shard in shards)).encode())
    return files


def resident_shards(model: nn.Module, layer_tensor_specs: Specs, layers: list[str], dtype: torch.dtype,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> list[Specs]:
    """A resident run's shards: the model's other tensors then the layers', filled as ``write_shards`` fills them
    (the layers in the given order: where that differs from the quantization order, tensors can move between
    shards, never in or out of the checkpoint)."""
    specs = {**plain_specs(model, layers, dtype), **layer_tensor_specs}
    groups = plan_shards({name: math.prod(shape) * dt.itemsize for name, (shape, dt) in specs.items()}, max_shard_bytes)
    return [{name: specs[name] for name in group} for group in groups]


def streamed_shards(model: nn.Module, blocks_path: str, num_blocks: int, layer_tensor_specs: Specs,
                    layers: list[str], dtype: torch.dtype) -> list[Specs]:
    """An ``--offload disk`` run's shards: the tensors outside the blocks, then one shard per block."""
    everything = {**plain_specs(model, layers, dtype), **layer_tensor_specs}
    prefixes = [f"{blocks_path}.{index}." for index in range(num_blocks)]
    outer = {name: spec for name, spec in everything.items() if not name.startswith(f"{blocks_path}.")}
    return [outer, *({name: spec for name, spec in everything.items() if name.startswith(prefix)} for prefix in prefixes)]


def native_side_file_bytes(model: nn.Module, tokenizer, records: dict[str, dict], record: dict,
                           dtype: torch.dtype) -> dict[str, int]:
    """File name -> bytes of a native checkpoint's files besides its shards, for these layer records and run
    record (the same for a resident run and a streamed one)."""
    return side_file_bytes(model, tokenizer, checkpoint_config(model, native_quantization_config(records, record), dtype))
