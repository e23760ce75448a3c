"""The GGUF layout: one ``.gguf`` file that llama.cpp loads, its quantized linears in llama.cpp's block formats.

Tensors take llama.cpp's names (``blk.N.attn_q.weight`` ...) and architecture keys (``llama.*``, ``qwen2.*``,
``qwen3.*``). Llama-architecture query and key rows are reordered into llama.cpp's rotary layout (each head's
two rotary halves interleaved), a permutation of output rows that moves each row's codes and scales unchanged.
Quantized linears are stored in their GGUF format's blocks (:mod:`quantkit.layouts.gguf_blocks`); other
matrices in float16 (or the float type asked for), vectors in float32. A GGUF file is not a checkpoint
directory: quantkit reads one back as a float model (``quantkit eval FILE.gguf``), through transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from gguf import (
    GGML_QUANT_SIZES,
    MODEL_ARCH,
    MODEL_ARCH_NAMES,
    GGMLQuantizationType,
    LlamaFileType,
    get_tensor_name_map,
)
from torch import nn

from quantkit.actquant import InputQuantization
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorPlan
from quantkit.formats.gguf import GGUFQuantizedTensor, exact_gguf_format, from_int
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.layouts.base import Encoded, Headers, LayerPlan, Layout
from quantkit.layouts.common import unique_state
from quantkit.layouts.gguf_blocks import block_bytes
from quantkit.schemes import GGUF_FALLBACK, GGUF_FORMATS, QuantScheme

FLOAT_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}  # unquantized exports
GGUF_TYPES = (*GGUF_FORMATS, *FLOAT_TYPES)  # what --gguf-type takes
GGML_TYPES = {"q8_0": GGMLQuantizationType.Q8_0, "q5_0": GGMLQuantizationType.Q5_0, "q4_0": GGMLQuantizationType.Q4_0,
              "q4_k": GGMLQuantizationType.Q4_K, "f32": GGMLQuantizationType.F32, "f16": GGMLQuantizationType.F16,
              "bf16": GGMLQuantizationType.BF16}
FILE_TYPES = {"q8_0": LlamaFileType.MOSTLY_Q8_0, "q5_0": LlamaFileType.MOSTLY_Q5_0, "q4_0": LlamaFileType.MOSTLY_Q4_0,
              "q4_k": LlamaFileType.MOSTLY_Q4_K_S, "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16,
              "bf16": LlamaFileType.MOSTLY_BF16}
# transformers model_type -> (llama.cpp architecture, whether query/key rows take llama.cpp's rotary order)
ARCHITECTURES = {"llama": (MODEL_ARCH.LLAMA, True), "mistral": (MODEL_ARCH.LLAMA, True),
                 "qwen2": (MODEL_ARCH.QWEN2, False), "qwen3": (MODEL_ARCH.QWEN3, False)}
TENSOR_TYPES_KEY = "tensor_types"  # Encoded.quantization_config: GGUF tensor name -> its GGUF_TYPES entry
METADATA_KEY = "metadata"  # Encoded.quantization_config: architecture and general keys


def check_gguf_type(name: str) -> str:
    """``name`` if it is a type this layout writes; a one-line refusal otherwise."""
    if name not in GGUF_TYPES:
        raise QuantkitError(f"unknown GGUF type {name!r}; choose one of {', '.join(GGUF_TYPES)}")
    return name


def architecture(config) -> tuple[MODEL_ARCH, bool]:
    """llama.cpp's architecture for a transformers config, and whether query/key rows are reordered."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise QuantkitError(f"GGUF export does not know llama.cpp's architecture for {model_type!r}; "
                            f"it writes {', '.join(ARCHITECTURES)}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise QuantkitError(f"GGUF export does not carry rope scaling ({rope.get('rope_type')}) yet")
    return ARCHITECTURES[model_type]


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def architecture_metadata(config, file_type: str) -> dict[str, object]:
    """The ``general.*`` and ``ARCH.*`` keys llama.cpp needs to build the model (values typed by the writer)."""
    arch, _ = architecture(config)
    name = MODEL_ARCH_NAMES[arch]
    rope = getattr(config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    head_dim = _head_dim(config)
    return {
        "general.architecture": name,
        "general.name": getattr(config, "name_or_path", "") or name,
        "general.file_type": int(FILE_TYPES[file_type]),
        "general.quantization_version": 2,
        "general.quantized_by": "quantkit",
        f"{name}.vocab_size": int(config.vocab_size),
        f"{name}.context_length": int(config.max_position_embeddings),
        f"{name}.embedding_length": int(config.hidden_size),
        f"{name}.block_count": int(config.num_hidden_layers),
        f"{name}.feed_forward_length": int(config.intermediate_size),
        f"{name}.attention.head_count": int(config.num_attention_heads),
        f"{name}.attention.head_count_kv": int(getattr(config, "num_key_value_heads", config.num_attention_heads)),
        f"{name}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{name}.attention.key_length": int(head_dim),
        f"{name}.attention.value_length": int(head_dim),
        f"{name}.rope.dimension_count": int(head_dim),
        f"{name}.rope.freq_base": float(theta),
    }


def rotary_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order llama.cpp's rotary layout gives a ``rows``-row query or key projection of ``heads`` heads:
    within each head, the rows of its two halves alternate."""
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


def _rotary_heads(config, name: str) -> int | None:
    """How many heads the rows of module ``name`` (a query or key projection) hold; None for other modules."""
    if name.endswith("q_proj"):
        return config.num_attention_heads
    if name.endswith("k_proj"):
        return getattr(config, "num_key_value_heads", config.num_attention_heads)
    return None


def _rows_taken(qt: GGUFQuantizedTensor, order: torch.Tensor) -> GGUFQuantizedTensor:
    """``qt`` with its output rows in ``order`` (every tensor it holds is per row)."""
    parts = [None if t is None else t[order] for t in (qt.codes, qt.d, qt.dmin, qt.sc, qt.m)]
    return GGUFQuantizedTensor(parts[0], parts[1], qt.scheme, *parts[2:])


class GGUFLayout(Layout):
    """Writes one ``.gguf`` file (``Encoded.quantization_config`` holds its tensor types and metadata)."""

    name = "gguf"
    quant_method = "gguf"
    kinds = ("gguf", "int")  # int: the symmetric schemes a legacy format holds exactly (formats.gguf.from_int)
    single_file = True
    runtimes = ("llama.cpp", "transformers (dequantized)", "quantkit eval (as a float model)")
    auto_dtype = torch.float16  # llama.cpp's own choice for the matrices it does not quantize

    def check(self, plan: TensorPlan | None = None, *, kinds: Iterable[str] = (),
              activations: InputQuantization | None = None, online: bool = False) -> None:
        if plan is not None:  # the scheme first: its refusal names the flag that fixes it
            self.check_scheme(plan.scheme)
        super().check(plan, kinds=kinds, activations=activations, online=online)

    def check_scheme(self, scheme: QuantScheme, column_groups: bool = False) -> None:
        if scheme.is_gguf or (exact_gguf_format(scheme) is not None and not column_groups):
            return
        raise QuantkitError(f"the gguf layout holds GGUF's block formats (or symmetric 4/8-bit int groups of whole "
                            f"32-column blocks, without g_idx), not {scheme.format} w{scheme.bits} "
                            f"g{scheme.group_size}{' asym' if not scheme.symmetric else ''}; quantize with "
                            f"--gguf-type {'|'.join(GGUF_FORMATS)}")

    def check_layer(self, name: str, scheme: QuantScheme, in_features: int) -> None:
        if scheme.format == "int" and exact_gguf_format(scheme, in_features) is None:
            raise QuantkitError(f"{name} has {in_features} inputs, no whole number of GGUF's 32-column blocks")
        scheme.for_columns(in_features).check_fits(name, in_features)

    def encode(self, model: nn.Module, quantized: dict[str, QuantizedTensor], quantization_config: dict,
               dtype: torch.dtype) -> Encoded:
        config = model.config
        arch, reorders = architecture(config)
        names = get_tensor_name_map(arch, config.num_hidden_layers)
        float_type = {v: k for k, v in FLOAT_TYPES.items()}.get(dtype, "f16")
        tensors: dict[str, torch.Tensor] = {}
        types: dict[str, str] = {}
        for name, tensor in _model_tensors(model, quantized).items():
            module = name.rpartition(".")[0]
            target = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise QuantkitError(f"GGUF export has no llama.cpp name for tensor {name}")
            heads = _rotary_heads(config, module) if reorders else None
            order = rotary_rows(quantized[module].shape[0] if module in quantized else tensor.shape[0], heads) \
                if heads else None
            if module in quantized and name.endswith(".weight"):
                qt = quantized[module]
                qt = from_int(qt) if isinstance(qt, IntQuantizedTensor) else qt
                qt = _rows_taken(qt, order) if order is not None else qt
                tensors[target] = torch.from_numpy(block_bytes(qt))
                types[target] = qt.scheme.format
                continue
            value = tensor.detach()[order] if order is not None else tensor.detach()
            kind = float_type if value.dim() > 1 else "f32"
            tensors[target] = value.to(FLOAT_TYPES[kind])
            types[target] = kind
        formats = [types[name] for name in types if types[name] in GGUF_FORMATS]
        # a super-block format names the file even where most rows took its fallback
        file_type = next((f for f in GGUF_FALLBACK if f in formats), None) or (
            max(GGUF_FORMATS, key=formats.count) if formats else float_type)
        return Encoded(tensors, {TENSOR_TYPES_KEY: types, METADATA_KEY: architecture_metadata(config, file_type)})

    def plan(self, model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
        raise QuantkitError("a GGUF file is not a checkpoint directory: quantkit reads it as a float model "
                            "(pass the .gguf file itself, e.g. quantkit eval FILE.gguf)")

    def nbytes(self, meta: dict, shape: tuple[int, int], dtype: torch.dtype) -> int:
        scheme = QuantScheme.from_dict(meta).for_columns(shape[1])
        block, size = _block_size(scheme.format if scheme.is_gguf else exact_gguf_format(scheme))
        return shape[0] * shape[1] // block * size

    def roles(self, meta: dict) -> dict[str, str]:
        return {"weight": "codes"}


def _block_size(fmt: str) -> tuple[int, int]:
    """``(columns, bytes)`` of one block of a GGUF format."""
    return GGML_QUANT_SIZES[GGML_TYPES[fmt]]


def _model_tensors(model: nn.Module, quantized: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Every tensor of the model, tied ones once (a tied head is llama.cpp's default); a quantized layer's
    stored tensors stand as one ``weight`` (its bias stays)."""
    state = {name: tensor for name, tensor in unique_state(model).items()
             if name.rpartition(".")[0] not in quantized or name.endswith(".bias")}
    state.update({f"{layer}.weight": torch.empty(0) for layer in quantized})
    return state
