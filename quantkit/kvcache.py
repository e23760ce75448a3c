"""KV-cache quantization: keys (after RoPE) and values rounded with static calibrated scales where attention
reads them, int8 or FP8 (E4M3), one scale per layer or per key/value head.

The model's attention implementation is wrapped (:func:`install`): the wrapper rounds the key and value states
the attention function receives (the whole cache, past and new; rounding a rounded value again with the same
scale changes nothing) with :func:`~quantkit.actquant.quantize_static`, then calls the implementation the
model had (``sdpa`` or its eager function). Each attention module keeps its scales as float32 buffers
``k_scale`` and ``v_scale`` (``[1]`` or ``[kv_heads]``), the names compressed-tensors and vLLM use.

Calibration (:func:`calibrate`) runs the calibration windows through the model as it will be served (weights
and activations quantized) with a wrapper that records each layer's largest ``|k|`` and ``|v|`` per head.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from quantkit.actquant import STATIC_FORMATS, activation_scheme, quantize_static, static_limit
from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.formats.grid import MIN_SCALE
from quantkit.schemes import QuantScheme

if TYPE_CHECKING:  # the declarations are passed in: this module (which layouts and the writer read) imports no model code
    from quantkit.models.adapters import ModelAdapter

KV_SCALES = ("k_scale", "v_scale")
KV_GRANULARITIES = ("tensor", "head")
_PREFIX = "quantkit_kv_"


@dataclass(frozen=True)
class KVCacheQuantization:
    """8-bit keys and values: ``int`` or ``fp8``, one static scale per layer (``tensor``) or per key/value head."""

    format: str = "fp8"
    granularity: str = "tensor"

    def __post_init__(self) -> None:
        if self.format not in STATIC_FORMATS:
            raise QuantkitError(f"unknown KV-cache format {self.format!r}; choose int or fp8")
        if self.granularity not in KV_GRANULARITIES:
            raise QuantkitError(f"unknown KV-cache granularity {self.granularity!r}; choose tensor or head")

    @property
    def scheme(self) -> QuantScheme:
        return activation_scheme(8, self.format)

    def scale_shape(self, kv_heads: int) -> tuple[int]:
        return (kv_heads,) if self.granularity == "head" else (1,)

    def record(self) -> dict:
        return asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> KVCacheQuantization:
        return cls(field(record, "format", str), field(record, "granularity", str, "tensor"))


def attention_modules(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    """Each decoder block's attention module (the parent of its attention output projection)."""
    if adapter.sites is None:
        raise QuantkitError(f"KV-cache quantization covers the Llama-shaped families (llama, mistral, qwen2, qwen3), "
                            f"not {adapter.name!r}")
    name = adapter.sites.attention_output.rpartition(".")[0]
    return [block.get_submodule(name) for block in adapter.get_blocks(model)]


def _inner(implementation: str, module: nn.Module) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if implementation != "eager" or eager is None:
        raise QuantkitError(f"KV-cache quantization cannot wrap attention implementation {implementation!r}")
    return eager


def _per_head(scale: torch.Tensor) -> torch.Tensor:
    """A ``[1]`` or ``[kv_heads]`` scale shaped for states ``[batch, kv_heads, tokens, head_dim]``."""
    return scale.reshape(1, -1, 1, 1)


def _wrap(implementation: str, transform: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple]) -> str:
    """Register an attention function that maps ``(key, value)`` through ``transform`` before the model's own
    ``implementation``; its name."""
    from transformers import AttentionInterface

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args, **kwargs):
        key, value = transform(module, key, value)
        return _inner(implementation, module)(module, query, key, value, *args, **kwargs)

    name = f"{_PREFIX}{implementation}"
    AttentionInterface.register(name, attention)
    return name


def _own_implementation(model: nn.Module) -> str:
    return model.config._attn_implementation.removeprefix(_PREFIX)


def _quantize_states(module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scheme = module.kv_quantization.scheme
    key = quantize_static(key, scheme, _per_head(module.k_scale.to(key.device))).to(key.dtype)
    value = quantize_static(value, scheme, _per_head(module.v_scale.to(value.device))).to(value.dtype)
    return key, value


def install(model: nn.Module, adapter: ModelAdapter, kv: KVCacheQuantization,
            scales: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Give every attention module of ``model`` its ``k_scale``/``v_scale`` buffers (``scales`` by block, or
    empty meta tensors a checkpoint fills) and switch attention to the quantizing wrapper."""
    kv_heads = adapter.heads(model)[1]
    for index, module in enumerate(attention_modules(model, adapter)):
        for name, given in zip(KV_SCALES, scales[index] if scales else (None, None)):
            value = given if given is not None else torch.empty(kv.scale_shape(kv_heads), device="meta")
            module.register_buffer(name, value.float().clone() if given is not None else value.float())
        module.kv_quantization = kv
    model.set_attn_implementation(_wrap(_own_implementation(model), _quantize_states))


def calibrate(model: nn.Module, adapter: ModelAdapter, kv: KVCacheQuantization, calib: torch.Tensor,
              batch_size: int) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Static ``(k_scale, v_scale)`` of every block from the calibration windows (see the module docstring),
    installed in ``model``; by block index. A one-line error when a layer saw no finite state."""
    modules = attention_modules(model, adapter)
    index_of = {id(module): i for i, module in enumerate(modules)}
    seen: dict[int, list[torch.Tensor]] = {}

    def record(module: nn.Module, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = [state.detach().abs().float().amax(dim=(0, 2, 3)) for state in (key, value)]
        i = index_of[id(module)]
        seen[i] = amax if i not in seen else [torch.maximum(a, b) for a, b in zip(seen[i], amax)]
        return key, value

    own = _own_implementation(model)
    model.set_attn_implementation(_wrap(own, record))
    try:
        with torch.no_grad():
            for batch in calib.split(batch_size):
                model(input_ids=batch.to(model.device), use_cache=False)
    finally:
        model.set_attn_implementation(own)
    limit = static_limit(kv.scheme)
    scales = {}
    for i in range(len(modules)):
        if i not in seen or not all(torch.isfinite(a).all() for a in seen[i]):
            raise QuantkitError(f"the calibration keys and values of {adapter.blocks}.{i} are missing or not finite: "
                                "no KV-cache scale")
        pair = [a if kv.granularity == "head" else a.amax().reshape(1) for a in seen[i]]
        scales[i] = tuple((a / limit).clamp_min(MIN_SCALE) for a in pair)
    install(model, adapter, kv, scales)
    return scales
