"""Fitting a uniform integer grid (scale, zero point) to rows of weights, GPTQ's conventions.

The range always includes 0. Asymmetric: ``scale = (max - min) / maxq``, ``zero = round(-min / scale)``.
Symmetric: ``scale = 2 * max|w| / maxq`` with the zero point fixed at ``2**(bits-1)``. Scales are rounded to
the dtype they are stored in before any code is computed, so stored and simulated weights agree exactly.
"""

from __future__ import annotations

import torch

from quantkit.schemes import QuantScheme

SCALE_DTYPE = torch.float16
_MIN_SCALE = 2.0**-24  # smallest positive float16; keeps every stored scale non-zero

# GPTQ's MSE clipping search: shrink the range by 1 - i/grid for i < maxshrink*grid, error norm 2.4.
_MSE_GRID, _MSE_MAXSHRINK, _MSE_NORM = 100, 0.8, 2.4


def quantize_to_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Nearest code on the grid (round half to even, as torch.round does), clamped to ``[0, maxq]``."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _grid_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, scheme: QuantScheme
) -> tuple[torch.Tensor, torch.Tensor]:
    maxq = scheme.maxq
    if scheme.symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    degenerate = (xmin == 0) & (xmax == 0)
    xmin = torch.where(degenerate, -1.0, xmin)
    xmax = torch.where(degenerate, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).clamp_min(_MIN_SCALE).to(SCALE_DTYPE).float()
    if scheme.symmetric:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fit_grid(w: torch.Tensor, scheme: QuantScheme, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` for ``w`` of shape ``[rows, cols]``, each of shape ``[rows]`` (float32).

    With ``mse`` the range is shrunk to the factor that minimises the row's ``sum |q - w|**2.4``.
    """
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale, zero = _grid_from_range(xmin, xmax, scheme)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(_MSE_MAXSHRINK * _MSE_GRID)):
        shrink = 1 - i / _MSE_GRID
        s, z = _grid_from_range(shrink * xmin, shrink * xmax, scheme)
        q = (quantize_to_codes(w, s[:, None], z[:, None], scheme.maxq) - z[:, None]) * s[:, None]
        err = (q - w).abs().pow(_MSE_NORM).sum(dim=1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero
