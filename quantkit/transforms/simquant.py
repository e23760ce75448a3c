"""Differentiable stand-ins for the quantizers, used while a transform is trained.

Rounding passes gradients straight through (STE); the range of every group is ``sigmoid(c)`` times its
maximum, with ``c`` a learnable clipping logit (FlatQuant's LWC for weights, one per output row; LAC for
activations, one per layer), initialised at 4 (a ratio of 0.982). One ratio scales both ends of the range
(FlatQuant learns separate ones for the maximum and the minimum; the schemes here are mostly symmetric). Integer grids follow the schemes'
conventions (symmetric: ``scale = 2·max/maxq`` around a mid-range zero point); the float formats round onto
E2M1 with an unrounded block scale ``max/6`` (the stored scale encodings are left to the real quantizer).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.formats.e2m1 import E2M1_MAX, e2m1_decode, e2m1_encode
from quantkit.schemes import QuantScheme

CLIP_INIT = 4.0
NO_CLIP = 30.0  # sigmoid(30) rounds to 1 in float32


def _straight_through(x: torch.Tensor, rounded: torch.Tensor) -> torch.Tensor:
    return x + (rounded - x).detach()


def _grouped(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    size = scheme.group_columns(x.shape[-1])
    pad = -x.shape[-1] % size
    if pad:
        x = nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, size)


def simulate(x: torch.Tensor, scheme: QuantScheme, ratio: torch.Tensor) -> torch.Tensor:
    """``x [..., K]`` fake-quantized group by group along ``K``; ``ratio`` broadcasts over ``x.shape[:-1]``."""
    cols = x.shape[-1]
    groups = _grouped(x, scheme)
    ratio = ratio.reshape(*ratio.shape, 1, 1) if ratio.dim() else ratio
    if scheme.is_float:
        scale = (groups.abs().amax(dim=-1, keepdim=True) * ratio / E2M1_MAX).clamp_min(1e-12)
        scaled = groups / scale
        out = _straight_through(scaled, e2m1_decode(e2m1_encode(scaled.detach()))) * scale
    else:
        maxq = scheme.maxq
        xmax = groups.amax(dim=-1, keepdim=True).clamp_min(0) * ratio
        xmin = groups.amin(dim=-1, keepdim=True).clamp_max(0) * ratio
        if scheme.symmetric:
            xmax = torch.maximum(xmax, -xmin)
            scale = (2 * xmax / maxq).clamp_min(1e-12)
            zero = torch.full_like(scale, float((maxq + 1) // 2))
        else:
            scale = ((xmax - xmin) / maxq).clamp_min(1e-12)
            zero = _straight_through(-xmin / scale, torch.round(-xmin / scale).detach())
        codes = torch.clamp(_straight_through(groups / scale, torch.round(groups / scale)) + zero, 0, maxq)
        out = (codes - zero) * scale
    return out.reshape(*x.shape[:-1], -1)[..., :cols]


class SimQuantizer(nn.Module):
    """A scheme's fake quantizer with learnable clipping (one logit per row with ``rows``, else one in all),
    or with ``learn_clip=False`` the plain min-max grid."""

    def __init__(self, scheme: QuantScheme, rows: int | None = None, learn_clip: bool = True) -> None:
        super().__init__()
        self.scheme = scheme
        init = torch.full((rows,) if rows else (), CLIP_INIT if learn_clip else NO_CLIP)
        self.clip_logit = nn.Parameter(init, requires_grad=learn_clip)

    def ratio(self) -> torch.Tensor:
        return torch.sigmoid(self.clip_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return simulate(x, self.scheme, self.ratio())
