"""Fake activation quantization: the inputs of quantized linears rounded, for W8A8/W4A8/W4A4 evaluation.

Dynamic (the default): each token (row of the input) gets its own scales, computed on the fly: per-token
integer grids (``int``, one symmetric scale per token unless a group size is given), E4M3 (``fp8``, one scale
per token) or E2M1 with block scales (``fp4``, ``mxfp4``, ``nvfp4``; NVFP4's float32 second-level scale is
taken per token too, where hardware uses one calibrated scale per tensor).

Static: one calibrated float32 scale per tensor (``[1]``) or per input channel (``[in]``), stored with the
layer as ``input_scale`` (:mod:`quantkit.actcalib` calibrates it): symmetric integers
``clamp(round(x / scale), -2**(b-1), 2**(b-1) - 1) · scale`` (vLLM's static int8), or ``fp8``
``e4m3(x / scale) · scale``. NVFP4's static part is its second-level scale: the 16-element blocks still take
their E4M3 scales on the fly, relative to the calibrated per-tensor ``1 / scale`` (compressed-tensors'
``input_global_scale``), so ``scale · 448 · 6`` is the largest ``|x|`` it reaches.

The values are quantized and immediately dequantized, so any kernel serves them, and gradients pass through
the rounding unchanged (straight-through); the same functions run in the freshly quantized model (as forward
pre-hooks) and in :class:`~quantkit.runtime.quant_linear.QuantLinear` after loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantkit.config_fields import field, optional_field
from quantkit.errors import QuantkitError
from quantkit.formats.e2m1 import E2M1_MAX, TENSOR_SCALED
from quantkit.formats.fp8 import E4M3_MAX, e4m3_round
from quantkit.formats.grid import FloatGrid, make_grid, quantize_groups
from quantkit.schemes import FIXED_BLOCK, FP8_FORMAT, GGUF_FORMATS, QuantScheme

ACT_BITS = (4, 8)
INPUT_SCALE = "input_scale"  # where a quantized layer keeps its static activation scale (buffer, stored tensor)
STATIC_FORMATS = ("int", FP8_FORMAT)
GRANULARITIES = ("tensor", "channel")
OBSERVERS = ("minmax", "percentile", "mse")


def activation_scheme(bits: int, fmt: str, group_size: int | None = None) -> QuantScheme:
    """The per-token scheme for ``bits``-bit activations in number format ``fmt`` (symmetric)."""
    if bits not in ACT_BITS:
        raise QuantkitError(f"activation bits must be one of {', '.join(map(str, ACT_BITS))}, got {bits}")
    if fmt in GGUF_FORMATS:
        raise QuantkitError(f"{fmt} is a weight format; activations take int, fp8 or an FP4 format")
    default = FIXED_BLOCK.get(fmt, -1)
    return QuantScheme(bits=bits, group_size=default if group_size is None else group_size, symmetric=True, format=fmt)


@dataclass(frozen=True)
class StaticActivations:
    """Calibrated static activation scales: one per tensor or per input channel, from the calibration tokens'
    ``|x|`` by an observer: ``minmax`` (the maximum), ``percentile`` (that percentile of ``|x|``) or ``mse``
    (the clipped maximum with the least squared quantization error)."""

    granularity: str = "tensor"
    observer: str = "minmax"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise QuantkitError(f"unknown activation granularity {self.granularity!r}; choose {' or '.join(GRANULARITIES)}")
        if self.observer not in OBSERVERS:
            raise QuantkitError(f"unknown activation observer {self.observer!r}; choose one of {', '.join(OBSERVERS)}")
        if not 0 < self.percentile <= 100:
            raise QuantkitError(f"activation percentile must be in (0, 100], got {self.percentile}")

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Refuse a scheme that has no static form: static scales are for whole rows of int or fp8, or NVFP4's
        per-tensor second-level scale."""
        if scheme.format in TENSOR_SCALED:
            if self.granularity != "tensor" or self.observer == "mse":
                raise QuantkitError(f"{scheme.format} activations take one static scale per tensor from the minmax "
                                    f"or percentile observer, not {self.granularity} {self.observer}")
            return
        if scheme.format not in STATIC_FORMATS or scheme.group_size != -1:
            raise QuantkitError(f"static activation scales are for int or fp8 activations without groups, not "
                                f"{scheme.format} with group size {scheme.group_size}")

    def scale_shape(self, in_features: int) -> tuple[int]:
        """The shape of a layer's ``input_scale``."""
        return (in_features,) if self.granularity == "channel" else (1,)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputQuantization:
    """How a checkpoint's quantized linears quantize their inputs: the scheme, and static scales or not."""

    scheme: QuantScheme
    static: StaticActivations | None = None

    def record(self) -> dict:
        """The native checkpoint's ``input_activations`` entry."""
        return {**self.scheme.to_dict(), "static": None if self.static is None else self.static.to_dict()}

    @classmethod
    def from_record(cls, record: dict) -> InputQuantization:
        """A :meth:`record` read back, validated (one-line errors)."""
        scheme = activation_scheme(field(record, "bits", int), field(record, "format", str),
                                   field(record, "group_size", int))
        static_record = optional_field(record, "static", dict, None)
        if static_record is None:
            return cls(scheme)
        static = StaticActivations(field(static_record, "granularity", str), field(static_record, "observer", str),
                                   field(static_record, "percentile", float, 99.99))
        static.check_scheme(scheme)
        return cls(scheme, static)


def static_limit(scheme: QuantScheme) -> float:
    """The largest magnitude a static scale maps onto: ``2**(b-1) - 1`` integer steps, E4M3's 448, or NVFP4's
    448 · 6."""
    if scheme.format in TENSOR_SCALED:
        return E4M3_MAX * E2M1_MAX
    return E4M3_MAX if scheme.format == FP8_FORMAT else float(2 ** (scheme.bits - 1) - 1)


def quantize_static(x: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor) -> torch.Tensor:
    """``x`` rounded onto the static grid of ``scale`` (``[1]`` or ``[x.shape[-1]]``), in float32."""
    if scheme.format in TENSOR_SCALED:
        rows = x.reshape(-1, x.shape[-1]).float()
        return quantize_groups(FloatGrid(scheme, False, 1 / scale.float()), rows)[2].reshape(x.shape)
    scaled = x.float() / scale
    if scheme.format == FP8_FORMAT:
        return e4m3_round(scaled).float() * scale
    low = -(2 ** (scheme.bits - 1))
    return torch.clamp(torch.round(scaled), low, -low - 1) * scale


class _StraightThrough(torch.autograd.Function):
    """Rounds in the forward pass; the backward pass hands the gradient on unchanged (clipped values too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, rounding: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        return rounding(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _per_token(x: torch.Tensor, scheme: QuantScheme, clip: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).float()
    grid = make_grid(scheme, rows, per_row=True, clip=None if clip == 1.0 else clip)
    return quantize_groups(grid, rows)[2].reshape(x.shape)


def fake_quantize_static(x: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor) -> torch.Tensor:
    """``x`` quantized and dequantized with the static ``scale`` (straight-through gradient), in ``x.dtype``."""
    return _StraightThrough.apply(x, lambda t: quantize_static(t, scheme, scale.to(t.device)))


def fake_quantize(x: torch.Tensor, scheme: QuantScheme, clip: float = 1.0) -> torch.Tensor:
    """``x [..., K]`` quantized and dequantized token by token under ``scheme``, in ``x.dtype``; ``clip`` < 1
    shrinks each token's range (a learned clipping ratio). Its gradient is the straight-through estimator:
    ``d fake_quantize(x) / dx`` is taken as the identity."""
    return _StraightThrough.apply(x, lambda t: _per_token(t, scheme, clip))


def attach_input_quantizers(model: nn.Module, layers: Iterable[str], scheme: QuantScheme,
                            clips: dict[str, float] | None = None,
                            scales: dict[str, torch.Tensor] | None = None) -> list[RemovableHandle]:
    """Quantize the input of every named linear of ``model`` with ``scheme`` from now on: per token (with its
    clipping ratio in ``clips``), or, for the layers in ``scales``, with that static scale, which the layer
    keeps as its ``input_scale`` buffer (and checkpoints store); the hook handles."""

    def dynamic(clip: float):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            return (fake_quantize(args[0], scheme, clip), *args[1:])

        return hook

    def static(module: nn.Module, args: tuple) -> tuple:
        return (fake_quantize_static(args[0], scheme, getattr(module, INPUT_SCALE)), *args[1:])

    clips, scales = clips or {}, scales or {}
    handles = []
    for name in layers:
        module = model.get_submodule(name)
        if name in scales:
            module.register_buffer(INPUT_SCALE, scales[name].float().clone())
            handles.append(module.register_forward_pre_hook(static))
        else:
            handles.append(module.register_forward_pre_hook(dynamic(clips.get(name, 1.0))))
    return handles
