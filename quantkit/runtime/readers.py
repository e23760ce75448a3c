"""Per-format knowledge the loader needs: which linears are quantized, their tensors, how to decode them.

A reader turns a checkpoint's quantization config into :class:`LayerPlan` objects, one per quantized linear:
the tensors to expect (checked against the safetensors headers before any data is read) and a decoder that
turns them into the native meta and buffers of a :class:`~quantkit.runtime.quant_linear.QuantLinear`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.export import compressed_tensors_format as ct
from quantkit.export import gptq_format as gptq
from quantkit.export.safetensors_io import SAFETENSORS_DTYPES, Headers
from quantkit.formats.base import QuantizedTensor, TensorSpec, tensor_class

_BY_HEADER_NAME = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


@dataclass
class LayerPlan:
    """One quantized linear: its stored tensors (relative names) and how to turn them into native buffers."""

    specs: dict[str, TensorSpec]
    meta: dict  # native-style description (kind, bits, group_size, symmetric, act_order, shape) for inspect
    decode: Callable[[dict[str, torch.Tensor]], tuple[dict, dict[str, torch.Tensor]]]


def _foreign(qt_of: Callable[[dict[str, torch.Tensor]], QuantizedTensor]):
    def decode(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        qt = qt_of(tensors)
        return {**qt.meta(), "shape": list(qt.shape)}, qt.to_tensors()

    return decode


def _describe(bits: int, group_size: int, symmetric: bool, act_order: bool, shape: tuple[int, int]) -> dict:
    return {"kind": "int", "bits": bits, "group_size": group_size, "symmetric": symmetric, "act_order": act_order,
            "shape": list(shape)}


def _scale_dtype(headers: Headers, name: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    """The stored dtype of a scale tensor when it is one we accept, else the format's default (first)."""
    dtype = _BY_HEADER_NAME.get(headers.get(name, ((), ""))[1])
    return dtype if dtype in allowed else allowed[0]


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise QuantkitError(f"checkpoint names layer {name}, which the model does not have") from None
    if not isinstance(module, nn.Linear):
        raise QuantkitError(f"checkpoint quantizes {name}, which is not a linear layer")
    return module


def _native_decode(meta: dict, shape: tuple[int, int]):
    """The native decoder: the stored tensors are the buffers; rebuilding the format's object checks them."""

    def decode(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
        tensor_class(meta["kind"]).from_tensors(tensors, meta, shape)
        return meta, tensors

    return decode


def _native_meta(name: str, meta: object, shape: tuple[int, int]) -> dict:
    """A layer entry of a native config, typed and checked against the model's linear; with its shape."""
    if not isinstance(meta, dict) or "kind" not in meta:
        raise QuantkitError(f"checkpoint entry for {name} does not describe a quantized linear layer")
    recorded = meta.get("shape", list(shape))
    if not isinstance(recorded, list) or [type(n) for n in recorded] != [int, int] or recorded != list(shape):
        raise QuantkitError(f"checkpoint records shape {recorded!r} for {name}, the model has {list(shape)}")
    return {**meta, "shape": list(shape)}


def native_plans(model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
    """quantkit's own format: the config's ``layers`` table fixes every tensor."""
    plans = {}
    for name, entry in qc["layers"].items():
        linear = _linear(model, name)
        shape = (linear.out_features, linear.in_features)
        meta = _native_meta(name, entry, shape)
        try:
            specs = tensor_class(field(meta, "kind", str)).expected_tensors(meta, shape)
        except QuantkitError as exc:
            raise QuantkitError(f"checkpoint entry for {name} is incomplete or invalid: {exc}") from None
        plans[name] = LayerPlan(specs, meta, _native_decode(meta, shape))
    return plans


def gptq_plans(model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
    """GPTQ v1/v2: every linear with a stored ``qweight`` is quantized with the config's scheme for it (the
    top-level one or its first matching ``dynamic`` override)."""
    config = gptq.parse_config(qc)
    plans = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.qweight" not in headers:
            continue
        layer = config.layer(name)
        scheme = layer.scheme()
        shape = (module.out_features, module.in_features)
        scale_dtype = _scale_dtype(headers, f"{name}.scales", gptq.SCALE_DTYPES)
        specs = gptq.expected_tensors(scheme.bits, scheme.num_groups(module.in_features), shape, scale_dtype,
                                      with_g_idx=f"{name}.g_idx" in headers)
        meta = _describe(scheme.bits, scheme.group_size, layer.sym, layer.desc_act and "g_idx" in specs, shape)
        plans[name] = LayerPlan(specs, meta, _foreign(
            lambda t, scheme=scheme, shape=shape: gptq.decode(t, scheme, shape, config.v1)))
    if not plans:
        raise QuantkitError("GPTQ checkpoint has no quantized layer (no tensor named *.qweight for a linear layer)")
    return plans


def compressed_tensors_plans(model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
    """pack-quantized (integer or FP4): the linears matched by a config group's targets and not ignored."""
    groups, ignore = ct.parse_config(qc)
    plans = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ct.matches(name, module, ignore):
            continue
        group = next((g for g in groups if ct.matches(name, module, g.targets)), None)
        if group is None:
            continue
        shape = (module.out_features, module.in_features)
        ct.check_layer(name, group.weights.scheme(), module.in_features)
        scale_dtype = _scale_dtype(headers, f"{name}.weight_scale", ct.SCALE_DTYPES)
        specs = ct.expected_tensors(group.weights, shape, scale_dtype)
        w = group.weights
        if w.format == "int":
            meta = _describe(w.bits, w.group_size, w.symmetric, w.g_idx, shape)
        else:
            meta = {"kind": "e2m1", **w.scheme().to_dict(), "shape": list(shape)}
        plans[name] = LayerPlan(specs, meta, _foreign(lambda t, a=w, shape=shape: ct.decode(t, a, shape)))
    if not plans:
        raise QuantkitError("compressed-tensors config targets no linear layer of this model")
    return plans
