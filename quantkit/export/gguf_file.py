"""Writing a GGUF file: the tensors and metadata the GGUF layout encoded, and the tokenizer keys, atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from gguf import GGUFValueType, GGUFWriter

from quantkit.export.atomic import atomic_file
from quantkit.layouts.base import Encoded
from quantkit.layouts.gguf import GGML_TYPES, METADATA_KEY, TENSOR_TYPES_KEY
from quantkit.layouts.gguf_vocab import Field

_VALUE_TYPES = {bool: GGUFValueType.BOOL, int: GGUFValueType.UINT32, float: GGUFValueType.FLOAT32,
                str: GGUFValueType.STRING}


def write_gguf(output: Path, encoded: Encoded, tokenizer_fields: list[Field], overwrite: bool = False) -> None:
    """Write ``encoded`` (see :class:`quantkit.layouts.gguf.GGUFLayout`) and the tokenizer keys as one GGUF file."""
    metadata = encoded.quantization_config[METADATA_KEY]
    types = encoded.quantization_config[TENSOR_TYPES_KEY]
    needed = sum(t.numel() * t.element_size() for t in encoded.tensors.values()) + (1 << 20)
    with atomic_file(output, overwrite, needed, "the GGUF file") as staged:
        writer = GGUFWriter(staged, metadata["general.architecture"])
        for key, value in metadata.items():
            if key != "general.architecture":
                writer.add_key_value(key, value, _VALUE_TYPES[type(value)])
        for key, value, value_type, element_type in tokenizer_fields:
            writer.add_key_value(key, value, value_type, sub_type=element_type)
        for name, tensor in encoded.tensors.items():
            kind = types[name]
            data = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
            writer.add_tensor(name, data.contiguous().numpy(), raw_dtype=GGML_TYPES[kind])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
