"""SpQR: GPTQ with small groups, quantized statistics and unstructured fp16 outliers (Dettmers et al., 2023).

Columns are visited in GPTQ order (identity or act-order) with the same error feedback. At the start of each
group of ``group_size`` columns, a min-max grid is fitted per output row; its scales and zero points are
quantized again (:func:`quantize_stats`). Before fitting, weights whose removal would lower the group's
Hessian-weighted error by more than the outlier threshold are left out of the fit (leave-one-out; the
simplified mode fits on every weight). Each column is then rounded, and a weight whose Hessian-weighted
error ``((w - q) / d)**2`` exceeds the threshold is kept at its float16 value instead; the error of what was
stored is propagated to the remaining columns. The threshold is relative to
``mean(var_rows(W) / diag(H^-1 factor)**2)``, so larger values mean fewer outliers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import TensorPlan
from quantkit.formats.spqr import (
    MAX_COLUMNS,
    CsrOutliers,
    SpQRQuantizedTensor,
    StatCodes,
    check_stat_options,
    first_level_grid,
    first_level_statistics,
    quantize_stats,
)
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.quantizers.gptq import act_order_perm, permuted_problem, sweep_columns, without_dead_columns
from quantkit.schemes import QuantScheme

_LOO_CHUNK_ELEMENTS = 2**24  # rows x group x group elements per leave-one-out chunk


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Dequantized nearest grid point of ``w`` (statistics broadcast against it)."""
    return scale * (torch.clamp(torch.round(w / scale + zero), 0, maxq) - zero)


def leave_one_out_gain(w: torch.Tensor, d: torch.Tensor, bits: int, symmetric: bool) -> torch.Tensor:
    """How much leaving each weight of a group out of its row's grid lowers the row's weighted error.

    ``w [rows, g]`` with ``g >= 2``, ``d [g]`` (diagonal of the inverse Hessian factor). The error of a grid is
    ``sum(((q - w) / d)**2)`` over the weights it quantizes; the weight left out is not quantized. The grid
    without weight ``i`` spans the row's range with ``i`` removed: its second smallest (largest) value when
    ``i`` is the minimum (maximum).
    """
    rows, g = w.shape
    maxq = 2**bits - 1
    scale, zero = first_level_grid(w.amin(1), w.amax(1), bits, symmetric)
    baseline = (((_round_to_grid(w, scale[:, None], zero[:, None], maxq) - w) / d) ** 2).sum(1, keepdim=True)
    lows = w.topk(2, dim=1, largest=False).values
    highs = w.topk(2, dim=1).values
    low = torch.where(w == lows[:, :1], lows[:, 1:], lows[:, :1])  # [rows, g]: the minimum without weight i
    high = torch.where(w == highs[:, :1], highs[:, 1:], highs[:, :1])
    scales, zeros = first_level_grid(low, high, bits, symmetric)
    left_out = torch.eye(g, dtype=torch.bool, device=w.device)
    gains = torch.empty(rows, g, device=w.device)
    chunk = max(1, _LOO_CHUNK_ELEMENTS // (g * g))
    for start in range(0, rows, chunk):
        part = w[start : start + chunk, None, :]  # [chunk, 1, g]: every weight, quantized by each grid i
        s, z = scales[start : start + chunk, :, None], zeros[start : start + chunk, :, None]
        err = ((_round_to_grid(part, s, z, maxq) - part) / d) ** 2  # [chunk, grid i, weight j]
        gains[start : start + chunk] = baseline[start : start + chunk] - err.masked_fill_(left_out, 0).sum(2)
    return gains


@dataclass
class SpQRQuantizer(Quantizer):
    """SpQR with bilevel statistics, leave-one-out outlier detection and act-order or identity order.

    ``outlier_threshold`` is relative (see the module docstring); ``inf`` keeps no outliers.
    """

    name = "spqr"
    needs_calibration = True
    default_group_size = 16
    default_symmetric = False
    any_format = False
    min_group_size = 2  # leave-one-out needs another weight in the group

    damp: float = 1.0
    outlier_threshold: float = 0.2
    act_order: bool = True
    simplified_outliers: bool = False
    stat_bits: int = 3
    stat_group_size: int = 16

    def __post_init__(self) -> None:
        if not self.damp >= 0:
            raise QuantkitError(f"damping must be a non-negative fraction of the mean Hessian diagonal, got {self.damp}")
        if not self.outlier_threshold > 0:
            raise QuantkitError(
                f"outlier threshold must be positive (relative to the mean weighted error; inf for no outliers), "
                f"got {self.outlier_threshold}"
            )
        check_stat_options(self.stat_bits, self.stat_group_size)

    def options(self, scheme: QuantScheme) -> dict:
        return asdict(self)

    def plan(self, scheme: QuantScheme) -> TensorPlan:
        extra = {"stat_bits": self.stat_bits, "stat_group_size": self.stat_group_size, "permuted": self.act_order}
        return TensorPlan("spqr", scheme, data_dependent=True, extra=extra)  # outliers: bytes depend on the data

    def quantize(self, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> SpQRQuantizedTensor:
        if stats.hessian is None:
            raise QuantkitError("SpQR needs the layer's Hessian from calibration data")
        self.check_scheme(scheme)
        out_features, n = weight.shape
        if n > MAX_COLUMNS:
            raise QuantkitError(f"SpQR layers hold at most {MAX_COLUMNS} input columns, got {n}")
        group = scheme.group_columns(n)
        w, h = without_dead_columns(weight, stats.hessian)
        w, hinv, perm = permuted_problem(w, h, act_order_perm(h) if self.act_order else None, self.damp)
        diag = torch.diag(hinv)
        threshold = self.outlier_threshold * (w.var(dim=0) / diag**2).mean().item()
        find_outliers = math.isfinite(threshold)
        maxq = scheme.maxq
        codes = torch.empty((n, out_features), dtype=torch.uint8, device=w.device)  # column-major while solving
        outlier = torch.zeros((n, out_features), dtype=torch.bool, device=w.device)
        kept = torch.zeros((n, out_features), dtype=torch.float32, device=w.device)
        scale_stats: list[StatCodes] = []
        zero_stats: list[StatCodes] = []
        grid: list[torch.Tensor] = []

        def start_group(col: int, pending: torch.Tensor) -> None:
            d = diag[col : col + pending.shape[2]]
            grid[:] = self._group_statistics(pending[0], d, threshold, scheme, scale_stats, zero_stats, stats.clip)

        def round_column(col: int, column: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return round_one(col, column[0], d[0])[None]

        def round_one(col: int, column: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            scale, zero = grid
            code = torch.clamp(torch.round(column / scale + zero), 0, maxq)
            codes[col] = code
            stored = scale * (code - zero)
            if find_outliers:
                is_outlier = ((column - stored) / d) ** 2 > threshold
                exact = column.half().float()
                outlier[col] = is_outlier
                kept[col] = torch.where(is_outlier, exact, 0)
                stored = torch.where(is_outlier, exact, stored)
            return stored

        sweep_columns(w[None], hinv[None], group, start_group, round_column)  # a batch of one problem

        inverse = torch.argsort(perm)
        mask = outlier.t()[:, inverse]
        values = kept.t()[:, inverse]
        return SpQRQuantizedTensor(
            codes=codes.t().contiguous(),
            scale_stats=_stack(scale_stats),
            zero_stats=_stack(zero_stats) if zero_stats else None,
            outliers=CsrOutliers.from_mask(mask, values),
            scheme=scheme,
            stat_bits=self.stat_bits,
            stat_group_size=self.stat_group_size,
            perm=perm if self.act_order else None,
        )

    def _group_statistics(
        self, w: torch.Tensor, d: torch.Tensor, threshold: float, scheme: QuantScheme,
        scale_stats: list[StatCodes], zero_stats: list[StatCodes], clip: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit one group's grid (likely outliers left out; range shrunk by ``clip`` per row), quantize its
        statistics, return them dequantized."""
        if math.isfinite(threshold) and not self.simplified_outliers and w.shape[1] > 1:
            likely = leave_one_out_gain(w, d, scheme.bits, scheme.symmetric) > threshold
            keep = (~likely).float()
            mean = (w * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)
            w = torch.where(likely, mean, w)
        ratio = 1.0 if clip is None else clip
        scale, zero = first_level_grid(w.amin(1) * ratio, w.amax(1) * ratio, scheme.bits, scheme.symmetric)
        quantized_scale = quantize_stats(scale[None, :], self.stat_bits, self.stat_group_size)
        scale_stats.append(quantized_scale)
        quantized_zero = None
        if not scheme.symmetric:
            quantized_zero = quantize_stats(zero[None, :], self.stat_bits, self.stat_group_size)
            zero_stats.append(quantized_zero)
        scales, zeros = first_level_statistics(quantized_scale, quantized_zero, scheme.bits, self.stat_group_size)
        return scales[0], zeros[0]


def _stack(stats: list[StatCodes]) -> StatCodes:
    return StatCodes(
        torch.cat([s.codes for s in stats]), torch.cat([s.scale for s in stats]), torch.cat([s.zero for s in stats])
    )
