"""Rounding weights onto a number format's grid, group by group (shared by RTN, GPTQ and activation quant).

Every function works along the last dimension: a group of columns is ``w[..., g]`` and its parameters have
shape ``w.shape[:-1]``.

Integer grid, GPTQ's conventions: the range always includes 0. Asymmetric: ``scale = (max - min) / maxq``,
``zero = round(-min / scale)``. Symmetric: ``scale = 2 * max|w| / maxq`` with the zero point fixed at
``2**(bits-1)``. Float (E2M1) grids: the block scale comes from the block maximum through the format's
:class:`~quantkit.formats.e2m1.ScaleCodec`. Scales are rounded to their stored encoding before any code is
computed, so stored and simulated weights agree exactly.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.formats.e2m1 import SCALE_CODECS, TENSOR_SCALED, e2m1_decode, e2m1_encode, global_scale
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.fp8 import E4M3_MAX, FP8_DTYPE, FP8QuantizedTensor, e4m3_round
from quantkit.formats.intgrid import SCALE_DTYPE, IntQuantizedTensor
from quantkit.schemes import QuantScheme

MIN_SCALE = 2.0**-24  # smallest positive float16; keeps every stored scale non-zero

# GPTQ's MSE clipping search: shrink the range by 1 - i/grid for i < maxshrink*grid, error norm 2.4.
_MSE_GRID, _MSE_MAXSHRINK, _MSE_NORM = 100, 0.8, 2.4
# Block-scale search for float formats: the block maximum times each factor, encoded, squared error.
_FLOAT_SEARCH_FACTORS = torch.linspace(0.5, 1.2, 15).tolist()

Params = tuple[torch.Tensor, ...]


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
    scale = ((xmax - xmin) / maxq).clamp_min(MIN_SCALE).to(SCALE_DTYPE).float()
    if scheme.symmetric:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def fit_grid(w: torch.Tensor, scheme: QuantScheme, mse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer ``(scale, zero)`` (float32) of each group ``w[..., :]``, shaped ``w.shape[:-1]``.

    With ``mse`` the range is shrunk to the factor that minimises the group's ``sum |q - w|**2.4``.
    """
    w = w.float()
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    scale, zero = _grid_from_range(xmin, xmax, scheme)
    if not mse:
        return scale, zero
    best = torch.full_like(scale, float("inf"))
    for i in range(int(_MSE_MAXSHRINK * _MSE_GRID)):
        shrink = 1 - i / _MSE_GRID
        s, z = _grid_from_range(shrink * xmin, shrink * xmax, scheme)
        q = (quantize_to_codes(w, s[..., None], z[..., None], scheme.maxq) - z[..., None]) * s[..., None]
        err = (q - w).abs().pow(_MSE_NORM).sum(dim=-1)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


class Grid(ABC):
    """One tensor's grid under a scheme: fit a group's parameters, round columns onto it, build the result.

    ``clip`` (a number, or one factor per row) shrinks every group's range before fitting: a learned
    clipping ratio (FlatQuant's LWC/LAC).
    """

    def __init__(self, scheme: QuantScheme, mse: bool, clip: torch.Tensor | float | None = None) -> None:
        self.scheme, self.mse, self.clip = scheme, mse, clip

    def clipped(self, w: torch.Tensor) -> torch.Tensor:
        """``w [rows, ..., cols]`` with each row's values scaled by its clipping ratio (for fitting only)."""
        if self.clip is None:
            return w
        if isinstance(self.clip, torch.Tensor):
            return w * self.clip.reshape(-1, *([1] * (w.dim() - 1)))
        return w * self.clip

    @abstractmethod
    def fit(self, w: torch.Tensor, group: int | None = None) -> Params:
        """Parameters of every group ``w[..., :]``, each shaped ``w.shape[:-1]``. ``group``: the index along the
        row of the one group ``w [rows, size]`` holds, for grids whose parameters depend on where a group sits
        (GGUF's super-blocks); None when ``w [rows, groups, size]`` holds every group of the row in order, or
        when the position does not matter."""

    @abstractmethod
    def round(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes uint8, float32 values)`` of ``x[..., c]`` on the grid of ``params`` (shaped ``x.shape[:-1]``)."""

    @abstractmethod
    def tensor(self, codes: torch.Tensor, params: Params, g_idx: torch.Tensor | None = None) -> QuantizedTensor:
        """The quantized tensor of codes ``[out, in]`` and per-group parameters shaped ``[out, groups]``."""


class IntGrid(Grid):
    """The uniform integer grid (GPTQ's conventions, above)."""

    def fit(self, w: torch.Tensor, group: int | None = None) -> Params:
        return fit_grid(self.clipped(w), self.scheme, self.mse)

    def round(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zero = (p[..., None] for p in params)
        codes = quantize_to_codes(x, scale, zero, self.scheme.maxq)
        return codes.to(torch.uint8), (codes - zero) * scale

    def tensor(self, codes: torch.Tensor, params: Params, g_idx: torch.Tensor | None = None) -> IntQuantizedTensor:
        scales, zeros = params
        return IntQuantizedTensor(codes, scales.to(SCALE_DTYPE), zeros.to(torch.uint8), self.scheme, g_idx)


class FloatGrid(Grid):
    """E2M1 elements times a block scale in the format's encoding (divided by a global scale for NVFP4).

    ``global_scale`` is a tensor broadcastable to the groups' leading shape (a scalar for a weight, ``[rows, 1]``
    for per-token activations); parameters are ``(stored scale, float32 scale)``. With ``mse`` every block
    takes the candidate scale with the smallest squared error.
    """

    def __init__(self, scheme: QuantScheme, mse: bool, global_scale: torch.Tensor | None,
                 clip: torch.Tensor | float | None = None) -> None:
        super().__init__(scheme, mse, clip)
        self.codec = SCALE_CODECS[scheme.format]
        self.global_scale = global_scale

    def _scale(self, stored: torch.Tensor) -> torch.Tensor:
        scale = self.codec.decode(stored)
        return scale if self.global_scale is None else scale / self.global_scale

    def _candidate(self, amax: torch.Tensor) -> Params:
        scaled = amax if self.global_scale is None else amax * self.global_scale
        stored = self.codec.encode(scaled)
        return stored, self._scale(stored)

    def fit(self, w: torch.Tensor, group: int | None = None) -> Params:
        w = w.float()
        amax = self.clipped(w).abs().amax(dim=-1)
        stored, scale = self._candidate(amax)
        if not self.mse:
            return stored, scale
        best = ((self.round(w, (stored, scale))[1] - w) ** 2).sum(dim=-1)
        chosen = torch.ones_like(amax)
        for factor in _FLOAT_SEARCH_FACTORS:
            err = ((self.round(w, self._candidate(amax * factor))[1] - w) ** 2).sum(dim=-1)
            better = err < best
            best = torch.where(better, err, best)
            chosen = torch.where(better, factor, chosen)
        return self._candidate(amax * chosen)

    def round(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        scale = params[1][..., None]
        codes = e2m1_encode(x / scale)
        return codes, e2m1_decode(codes) * scale

    def tensor(self, codes: torch.Tensor, params: Params, g_idx: torch.Tensor | None = None) -> FloatQuantizedTensor:
        if g_idx is not None:
            raise QuantkitError("float formats keep their blocks contiguous: no act-order groups")
        global_scale = None if self.global_scale is None else self.global_scale.reshape(1).float()
        return FloatQuantizedTensor(codes, params[0], self.scheme, global_scale)


class FP8Grid(Grid):
    """E4M3 elements times a float32 scale ``amax / 448`` per group (:mod:`quantkit.formats.fp8`); parameters
    are ``(scale,)``, one per row of each group even where blocks of ``block_rows`` rows share it (every row of a
    block holds the block's scale; :meth:`tensor` keeps one per block). With ``mse`` every group (or block) takes
    the candidate scale (its maximum × 0.5…1.2) with the smallest squared error.

    Blocks of rows are pooled along the first dimension of what :meth:`fit` is given, so it must be given every
    row of the tensor (as RTN and GPTQ do)."""

    def _pooled(self, per_row: torch.Tensor, reduce: str) -> torch.Tensor:
        """``per_row [rows, ...]`` reduced (``amax`` or ``sum``) over each block of rows, repeated back per row."""
        rows = per_row.shape[0]
        size = self.scheme.row_block(rows)
        if size == 1:
            return per_row
        blocks = -(-rows // size)
        padded = torch.nn.functional.pad(per_row.movedim(0, -1), (0, blocks * size - rows)).movedim(-1, 0)
        stacked = padded.reshape(blocks, size, *per_row.shape[1:])
        pooled = stacked.amax(dim=1) if reduce == "amax" else stacked.sum(dim=1)
        return pooled.repeat_interleave(size, dim=0)[:rows]

    def _fit_one(self, amax: torch.Tensor) -> torch.Tensor:
        return (amax / E4M3_MAX).clamp_min(MIN_SCALE)

    def _error(self, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self._pooled(((self.round(w, (scale,))[1] - w) ** 2).sum(dim=-1), "sum")

    def fit(self, w: torch.Tensor, group: int | None = None) -> Params:
        w = w.float()
        amax = self._pooled(self.clipped(w).abs().amax(dim=-1), "amax")
        scale = self._fit_one(amax)
        if self.mse:
            best = self._error(w, scale)
            for factor in _FLOAT_SEARCH_FACTORS:
                candidate = self._fit_one(amax * factor)
                err = self._error(w, candidate)
                better = err < best
                best, scale = torch.where(better, err, best), torch.where(better, candidate, scale)
        return (scale,)

    def round(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        scale = params[0][..., None]
        values = e4m3_round(x / scale)
        return values.view(torch.uint8), values.float() * scale

    def tensor(self, codes: torch.Tensor, params: Params, g_idx: torch.Tensor | None = None) -> FP8QuantizedTensor:
        if g_idx is not None:
            raise QuantkitError("fp8 keeps its groups contiguous: no act-order groups")
        per_block = params[0][::self.scheme.row_block(codes.shape[0])]
        return FP8QuantizedTensor(codes.view(FP8_DTYPE), per_block.float().contiguous(), self.scheme)


def make_grid(scheme: QuantScheme, w: torch.Tensor, mse: bool = False, per_row: bool = False,
              clip: torch.Tensor | float | None = None) -> Grid:
    """The grid for ``w [rows, cols]`` under ``scheme``; NVFP4's global scale from the whole tensor, or from
    each row with ``per_row`` (dynamic per-token activations); GGUF's super-block scales from the whole
    tensor. ``clip``: see :class:`Grid`."""
    if scheme.is_gguf:
        from quantkit.formats.gguf import GGUFGrid  # it builds on Grid: imported here, not at the top

        return GGUFGrid(scheme, mse, w, clip)
    if scheme.is_fp8:
        return FP8Grid(scheme, mse, clip)
    if not scheme.is_float:
        return IntGrid(scheme, mse, clip)
    tensor_scale = None
    if scheme.format in TENSOR_SCALED:
        amax = w.abs().amax(dim=-1, keepdim=True) if per_row else w.abs().amax()
        tensor_scale = global_scale(amax)
    return FloatGrid(scheme, mse, tensor_scale, clip)


def rows_independent(scheme: QuantScheme) -> bool:
    """Whether :func:`make_grid` treats a tensor's rows independently (no scale drawn from the whole tensor or
    shared by blocks of rows), so that stacking tensors' rows changes no row's result."""
    return not scheme.is_gguf and scheme.format not in TENSOR_SCALED and scheme.block_rows == 1


def quantize_groups(grid: Grid, w: torch.Tensor) -> tuple[torch.Tensor, Params, torch.Tensor]:
    """Round-to-nearest of ``w [rows, cols]`` in consecutive groups: ``(codes, params [rows, groups], values)``.

    A partial last group is padded with zeros, which changes no group's range and rounds exactly.
    """
    rows, cols = w.shape
    size, groups = grid.scheme.group_columns(cols), grid.scheme.num_groups(cols)
    padded = torch.nn.functional.pad(w.float(), (0, groups * size - cols)).reshape(rows, groups, size)
    params = grid.fit(padded)
    codes, values = grid.round(padded, params)
    return codes.reshape(rows, -1)[:, :cols], params, values.reshape(rows, -1)[:, :cols]
