"""Pieces the third-party layouts share: which layers they can hold, lossless dtypes, reading the model."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.fp8 import FP8QuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.layouts.base import SAFETENSORS_DTYPES, DecodedLayer, Headers
from quantkit.schemes import QuantScheme

VLLM_WEIGHT_BITS = (4, 8)  # the integer widths vLLM's CPU build (its CPUWNA16 kernel) serves


def vllm_moe_refusals(scheme: QuantScheme) -> list[str]:
    """What vLLM 0.32's CPU build refuses of routed experts quantized with ``scheme`` (GPTQ or compressed-tensors):
    its int4 expert kernels need AMX, or AMD's zentorch (with int8 activations, symmetric weights only)."""
    lines = []
    if scheme.format == "int" and scheme.bits == 4:
        lines.append("vLLM's CPU build serves 4-bit routed experts only on a CPU with AMX, or with AMD's zentorch "
                     "installed and VLLM_CPU_INT4_W4A8=1 (int8 activations); elsewhere it refuses the model "
                     "(\"No WNA16 MoE backend supports the deployment configuration\")")
    if scheme.format == "int" and not scheme.symmetric:
        lines.append("vLLM's zentorch MoE backend takes symmetric experts only: drop --asym")
    return lines
_BY_HEADER_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


def grid_layers(quantized: dict[str, QuantizedTensor], format_name: str, floats: bool = True) -> dict[str, QuantizedTensor]:
    """The quantized layers, refusing any that is not on an integer grid (or an FP4 or FP8 one, with ``floats``)."""
    allowed = (IntQuantizedTensor, FloatQuantizedTensor, FP8QuantizedTensor) if floats else (IntQuantizedTensor,)
    for name, qt in quantized.items():
        if not isinstance(qt, allowed):
            what = "integer-grid, FP4 or FP8" if floats else "integer-grid"
            raise QuantkitError(f"{format_name} export supports only {what} weights; {name} is {qt.meta()['kind']}")
    if not quantized:
        raise QuantkitError(f"nothing to export as {format_name}: the model has no quantized layers")
    return quantized


def lossless_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """``tensor`` in ``dtype`` if that changes no value, else None."""
    cast = tensor.to(dtype)
    return cast if torch.equal(cast.to(tensor.dtype), tensor) else None


def sequential_g_idx(scheme: QuantScheme, in_features: int) -> torch.Tensor:
    """The group of each input column when groups are contiguous (no act-order)."""
    return (torch.arange(in_features) // scheme.group_columns(in_features)).to(torch.int32)


def header_dtype(headers: Headers, name: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """The stored dtype of tensor ``name`` when it is one of ``allowed``, else the layout's default (the first)."""
    dtype = _BY_HEADER_NAME.get(headers.get(name, ((), ""))[1])
    return dtype if dtype in allowed else allowed[0]


def model_linear(model: nn.Module, name: str) -> nn.Linear:
    """The linear ``name`` of ``model``; refuses a name it lacks or a module that is not linear."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise QuantkitError(f"checkpoint names layer {name}, which the model does not have") from None
    if not isinstance(module, nn.Linear):
        raise QuantkitError(f"checkpoint quantizes {name}, which is not a linear layer")
    return module


def int_description(bits: int, group_size: int, symmetric: bool, act_order: bool, shape: tuple[int, int]) -> dict:
    """A native-style description of a stored integer layer, for inspect."""
    return {"kind": "int", "bits": bits, "group_size": group_size, "symmetric": symmetric, "act_order": act_order,
            "shape": list(shape)}


def decoded(qt: QuantizedTensor) -> DecodedLayer:
    """A foreign layer decoded to ``qt``, kept natively."""
    return DecodedLayer(qt, {**qt.meta(), "shape": list(qt.shape)}, qt.to_tensors())


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
