"""The native layout: every quantized tensor kind's own tensors, self-described in config.json.

Format version 2 also stores, under each quantized linear's ``weight`` name, an empty placeholder tensor (shape
``(0,)``, no data). A reader that does not know quantkit's ``quant_method`` (plain ``transformers``, which then
skips the quantization config) finds a ``weight`` of the wrong shape there and refuses the checkpoint, instead of
initialising the missing weights at random; quantkit's loader expects the placeholders and drops them. Version 1
checkpoints (without them) are still read.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quantkit.actquant import InputQuantization
from quantkit.config_fields import check_type, field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorSpec, tensor_class
from quantkit.kvcache import KVCacheQuantization
from quantkit.layouts.base import DecodedLayer, Encoded, Headers, LayerPlan, Layout, specs_bytes
from quantkit.layouts.common import model_linear

QUANT_METHOD = "quantkit"
FORMAT_NAME = "native"
FORMAT_VERSION = 2
PLACEHOLDER_VERSION = 2  # the first format version with a placeholder per quantized linear


def placeholder_specs(layers: Iterable[str], version: int = FORMAT_VERSION) -> dict[str, TensorSpec]:
    """The empty tensors a native checkpoint of format ``version`` stores in place of the quantized linears'
    weights: name -> (shape, dtype)."""
    if version < PLACEHOLDER_VERSION:
        return {}
    return {f"{layer}.weight": ((0,), torch.uint8) for layer in layers}


def layer_tensors(quantized: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """The quantized layers' tensors and their placeholders, by full name."""
    tensors = {f"{layer}.{name}": t for layer, qt in quantized.items() for name, t in qt.to_tensors().items()}
    tensors.update({name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in placeholder_specs(quantized).items()})
    return tensors


def layer_records(quantized: dict[str, QuantizedTensor]) -> dict[str, dict]:
    """The per-layer table of the quantization config: each quantized layer's meta and shape."""
    return {name: {**qt.meta(), "shape": list(qt.shape)} for name, qt in quantized.items()}


def native_quantization_config(layers: dict[str, dict], record: dict) -> dict:
    """The ``quantization_config`` of a native checkpoint: format, the run's ``record`` and the layer table."""
    return {"quant_method": QUANT_METHOD, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, **record,
            "layers": layers}


def _layer_meta(name: str, meta: object, shape: tuple[int, int]) -> dict:
    """A layer entry of a native config, typed and checked against the model's linear; with its shape."""
    if not isinstance(meta, dict) or "kind" not in meta:
        raise QuantkitError(f"checkpoint entry for {name} does not describe a quantized linear layer")
    recorded = meta.get("shape", list(shape))
    if not isinstance(recorded, list) or [type(n) for n in recorded] != [int, int] or recorded != list(shape):
        raise QuantkitError(f"checkpoint records shape {recorded!r} for {name}, the model has {list(shape)}")
    return {**meta, "shape": list(shape)}


def _decoder(meta: dict, shape: tuple[int, int]):
    """The stored tensors are the buffers; rebuilding the kind's object checks them."""

    def decode(tensors: dict[str, torch.Tensor]) -> DecodedLayer:
        return DecodedLayer(tensor_class(meta["kind"]).from_tensors(tensors, meta, shape), meta, tensors)

    return decode


class NativeLayout(Layout):
    """quantkit's own layout: holds every tensor kind, activation quantization and online input maps."""

    name = FORMAT_NAME
    quant_method = QUANT_METHOD
    runtimes = ("quantkit.load", "transformers (after import quantkit)")

    def encode(self, model: nn.Module, quantized: dict[str, QuantizedTensor], quantization_config: dict,
               dtype: torch.dtype) -> Encoded:
        return Encoded(layer_tensors(quantized), native_quantization_config(layer_records(quantized), quantization_config))

    def check_config(self, folder: Path, qc: dict) -> None:
        """A known format version and a per-layer table."""
        version = qc.get("format_version")
        if qc.get("format") != FORMAT_NAME or type(version) is not int or not 1 <= version <= FORMAT_VERSION:
            newer = qc.get("format") == FORMAT_NAME and type(version) is int and version > FORMAT_VERSION
            raise QuantkitError(f"unsupported checkpoint format {qc.get('format')!r} version {version!r}; this "
                                f"quantkit reads {FORMAT_NAME!r} versions 1 to {FORMAT_VERSION}"
                                + (" (a newer quantkit may read it)" if newer else ""))
        if not isinstance(qc.get("layers"), dict):
            raise QuantkitError(f"corrupt quantization_config in {folder}: no per-layer table")

    def plan(self, model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
        """The config's ``layers`` table fixes every tensor."""
        plans = {}
        for name, entry in qc["layers"].items():
            linear = model_linear(model, name)
            shape = (linear.out_features, linear.in_features)
            meta = _layer_meta(name, entry, shape)
            try:
                specs = tensor_class(field(meta, "kind", str)).expected_tensors(meta, shape)
            except QuantkitError as exc:
                raise QuantkitError(f"checkpoint entry for {name} is incomplete or invalid: {exc}") from None
            plans[name] = LayerPlan(specs, meta, self.roles(meta), _decoder(meta, shape))
        return plans

    def input_quantization(self, qc: dict) -> InputQuantization | None:
        recorded = qc.get("input_activations")
        if recorded is None:
            return None
        if not isinstance(recorded, dict):
            raise QuantkitError(f"corrupt input_activations in quantization_config: {recorded!r} is not an object")
        try:
            return InputQuantization.from_record(recorded)
        except QuantkitError as exc:
            raise QuantkitError(f"corrupt input_activations in quantization_config: {exc}") from None

    def kv_cache(self, qc: dict) -> KVCacheQuantization | None:
        recorded = qc.get("kv_cache")
        if recorded is None:
            return None
        try:
            return KVCacheQuantization.from_record(check_type(recorded, dict, "kv_cache"))
        except QuantkitError as exc:
            raise QuantkitError(f"corrupt kv_cache in quantization_config: {exc}") from None

    def extra_specs(self, qc: dict, layers: Iterable[str]) -> dict[str, TensorSpec]:
        return placeholder_specs(layers, qc["format_version"])

    def nbytes(self, meta: dict, shape: tuple[int, int], dtype: torch.dtype) -> int:
        return specs_bytes(tensor_class(meta["kind"]).expected_tensors(meta, shape))

    def roles(self, meta: dict) -> dict[str, str]:
        return tensor_class(meta["kind"]).roles
