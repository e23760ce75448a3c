"""Fake activation quantization: the inputs of quantized linears rounded per token, for W4A4/W4A8 evaluation.

Each token (row of the input) gets its own scales, computed on the fly (dynamic): per-token integer grids
(``int``, one symmetric scale per token unless a group size is given) or E2M1 with block scales (``fp4``,
``mxfp4``, ``nvfp4``; NVFP4's float32 second-level scale is taken per token too, where hardware uses one
calibrated scale per tensor). The values are quantized and immediately dequantized, so any kernel serves
them, and gradients pass through the rounding unchanged (straight-through); the same function runs in the
freshly quantized model (as a forward pre-hook) and in :class:`~quantkit.runtime.quant_linear.QuantLinear`
after loading.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantkit.errors import QuantkitError
from quantkit.formats.grid import make_grid, quantize_groups
from quantkit.schemes import FIXED_BLOCK, QuantScheme

ACT_BITS = (4, 8)


def activation_scheme(bits: int, fmt: str, group_size: int | None = None) -> QuantScheme:
    """The per-token scheme for ``bits``-bit activations in number format ``fmt`` (symmetric)."""
    if bits not in ACT_BITS:
        raise QuantkitError(f"activation bits must be one of {', '.join(map(str, ACT_BITS))}, got {bits}")
    default = FIXED_BLOCK.get(fmt, -1)
    return QuantScheme(bits=bits, group_size=default if group_size is None else group_size, symmetric=True, format=fmt)


class _StraightThrough(torch.autograd.Function):
    """Rounds in the forward pass; the backward pass hands the gradient on unchanged (clipped values too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scheme: QuantScheme, clip: float) -> torch.Tensor:  # type: ignore[override]
        rows = x.reshape(-1, x.shape[-1]).float()
        grid = make_grid(scheme, rows, per_row=True, clip=None if clip == 1.0 else clip)
        return quantize_groups(grid, rows)[2].reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        return grad, None, None


def fake_quantize(x: torch.Tensor, scheme: QuantScheme, clip: float = 1.0) -> torch.Tensor:
    """``x [..., K]`` quantized and dequantized token by token under ``scheme``, in ``x.dtype``; ``clip`` < 1
    shrinks each token's range (a learned clipping ratio). Its gradient is the straight-through estimator:
    ``d fake_quantize(x) / dx`` is taken as the identity."""
    return _StraightThrough.apply(x, scheme, clip)


def attach_input_quantizers(model: nn.Module, layers: Iterable[str], scheme: QuantScheme,
                            clips: dict[str, float] | None = None) -> list[RemovableHandle]:
    """Quantize the input of every named linear of ``model`` with ``scheme`` (and its clipping ratio in
    ``clips``) from now on; the hook handles."""

    def hook_for(clip: float):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            return (fake_quantize(args[0], scheme, clip), *args[1:])

        return hook

    clips = clips or {}
    return [model.get_submodule(name).register_forward_pre_hook(hook_for(clips.get(name, 1.0))) for name in layers]
