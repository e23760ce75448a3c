"""The disk contract: what every checkpoint layout answers, and the vocabulary of stored tensors.

A layout can say whether it stores what a quantizer makes (:meth:`Layout.check`), write the layer tensors
and quantization config of a run (:meth:`Layout.encode`), plan and validate a stored checkpoint's quantized
layers from its safetensors headers (:meth:`Layout.plan`), count a layer's bytes before quantizing
(:meth:`Layout.nbytes`) and say what each stored tensor holds (:meth:`Layout.roles`).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from quantkit.actquant import INPUT_SCALE, InputQuantization
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorPlan, TensorSpec
from quantkit.kvcache import KVCacheQuantization
from quantkit.schemes import QuantScheme

# torch dtype -> the dtype name a safetensors header uses
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
}
DTYPE_BYTES = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}
# tensor name -> (shape, safetensors dtype name), read from headers alone
Headers = dict[str, tuple[tuple[int, ...], str]]


@dataclass
class DecodedLayer:
    """One stored quantized linear, decoded once: the in-memory tensor (what kernels prepare from), and the
    native meta and buffers a QuantLinear keeps."""

    quantized: QuantizedTensor
    meta: dict
    buffers: dict[str, torch.Tensor]


@dataclass
class LayerPlan:
    """One quantized linear of a stored checkpoint: its tensors (relative names), a native-style description
    (kind, scheme, act-order, shape) for inspect, what each tensor holds, and how to decode them."""

    specs: dict[str, TensorSpec]
    meta: dict
    roles: dict[str, str]
    decode: Callable[[dict[str, torch.Tensor]], DecodedLayer]


@dataclass
class Encoded:
    """What a layout writes for a run: the quantized layers' tensors (full names), the ``quantization_config``
    of config.json, and any extra JSON files."""

    tensors: dict[str, torch.Tensor]
    quantization_config: dict
    extra_json: dict[str, dict] = field(default_factory=dict)


def specs_bytes(specs: dict[str, TensorSpec]) -> int:
    """Bytes the tensors ``specs`` describe take."""
    return sum(math.prod(size) * dtype.itemsize for size, dtype in specs.values())


class Layout(ABC):
    """One checkpoint layout. ``kinds``: the tensor kinds it holds (None: every kind, activation quantization
    and online input maps too)."""

    name: ClassVar[str]
    quant_method: ClassVar[str]  # the ``quant_method`` of its quantization_config
    kinds: ClassVar[tuple[str, ...] | None] = None
    single_file: ClassVar[bool] = False  # one file (GGUF) rather than a checkpoint directory
    auto_dtype: ClassVar[torch.dtype | None] = None  # what --dtype auto keeps unquantized tensors in (None: the source's)
    # the runtimes known to load this layout (README, "Which runtime loads what"); a line of
    # :meth:`refusing_runtimes` opens with the name of the runtime that refuses
    runtimes: ClassVar[tuple[str, ...]] = ()

    def check(self, plan: TensorPlan | None = None, *, kinds: Iterable[str] = (),
              activations: InputQuantization | None = None, online: bool = False) -> None:
        """Refuse, before any long work, what it cannot store: a tensor kind (``kinds``, or ``plan``'s), a
        scheme or act-order grouping (``plan``), activation quantization or a transform's online input maps."""
        if self.kinds is None:
            return
        for kind in [*kinds, *([plan.kind] if plan is not None else [])]:
            if kind not in self.kinds:
                raise QuantkitError(f"the {self.name} layout cannot hold {kind} layers; use --layout native")
        if activations is not None:
            self.check_activations(activations)
        if online:
            raise QuantkitError(f"the {self.name} layout cannot hold a transform's online input maps; use --layout native")
        if plan is not None:
            self.check_scheme(plan.scheme, plan.column_groups)

    def check_kv_cache(self, kv: KVCacheQuantization) -> None:
        """Refuse KV-cache quantization it cannot record (by default: any, unless it holds everything)."""
        if self.kinds is not None:
            raise QuantkitError(f"the {self.name} layout cannot record KV-cache quantization; use --layout native")

    def kv_cache(self, qc: dict) -> KVCacheQuantization | None:
        """The KV-cache quantization a stored checkpoint records (None: none)."""
        return None

    def check_activations(self, inputs: InputQuantization) -> None:
        """Refuse activation quantization it cannot record (by default: any)."""
        raise QuantkitError(f"the {self.name} layout cannot record quantkit's activation quantization; use --layout native")

    def check_scheme(self, scheme: QuantScheme, column_groups: bool = False) -> None:  # noqa: B027 (a hook: by default it accepts)
        """Refuse a scheme (with act-order grouping) it cannot store."""

    def refusing_runtimes(self, scheme: QuantScheme, column_groups: bool = False) -> list[str]:
        """One line for each known runtime that refuses this layout holding ``scheme`` (with act-order
        groups), naming the runtime and the flag that fixes it; none by default."""
        return []

    def refusing_moe_runtimes(self, scheme: QuantScheme) -> list[str]:
        """One line for each known runtime that refuses routed experts of ``scheme`` in this layout; none by
        default."""
        return []

    def check_layer(self, name: str, scheme: QuantScheme, in_features: int) -> None:  # noqa: B027 (a hook: by default it accepts)
        """Refuse a layer of ``in_features`` inputs it cannot store with ``scheme``."""

    @abstractmethod
    def encode(self, model: nn.Module, quantized: dict[str, QuantizedTensor], quantization_config: dict,
               dtype: torch.dtype) -> Encoded:
        """The layers' tensors and configs; integer scales in ``dtype`` (the model's) where the layout says so."""

    def check_config(self, folder: Path, qc: dict) -> None:  # noqa: B027 (a hook: by default it accepts)
        """Refuse a stored quantization config it cannot read, before anything else is read."""

    @abstractmethod
    def plan(self, model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
        """The quantized linears of a stored checkpoint of ``model`` and their tensors, from its config and
        safetensors headers alone."""

    def input_quantization(self, qc: dict) -> InputQuantization | None:
        """How a stored checkpoint's quantized layers quantize their inputs (None: they do not)."""
        return None

    def stored_input_scale(self, inputs: InputQuantization) -> tuple[str, bool]:
        """The name a layer's static activation scale is stored under, and whether it holds the reciprocal of
        quantkit's ``input_scale`` (a divisor); by default ``input_scale`` itself."""
        return INPUT_SCALE, False

    def extra_specs(self, qc: dict, layers: Iterable[str]) -> dict[str, TensorSpec]:
        """Tensors it stores besides the layers' own and the model's plain ones (full names)."""
        return {}

    @abstractmethod
    def nbytes(self, meta: dict, shape: tuple[int, int], dtype: torch.dtype) -> int:
        """Bytes a ``shape`` layer with tensor ``meta`` takes in this layout (``dtype``: the model's)."""

    @abstractmethod
    def roles(self, meta: dict) -> dict[str, str]:
        """What each stored tensor of a layer with native-style ``meta`` holds (one of ``formats.ROLES``)."""
