"""Round-to-nearest: each group's grid from its own min/max (optionally MSE-clipped), no calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.quantizers.grid import fit_grid, quantize_to_codes
from quantkit.schemes import QuantScheme


def group_slices(in_features: int, group_size: int) -> list[slice]:
    """Column ranges of consecutive groups; the last one may be partial."""
    size = in_features if group_size == -1 else group_size
    return [slice(start, min(start + size, in_features)) for start in range(0, in_features, size)]


@dataclass
class RTNQuantizer(Quantizer):
    """Min-max round-to-nearest per group; ``mse`` searches a clipping ratio per row and group."""

    name = "rtn"
    needs_calibration = False

    mse: bool = False

    def quantize(self, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> IntQuantizedTensor:
        w = weight.float()
        codes = torch.empty(w.shape, dtype=torch.uint8)
        scales, zeros = [], []
        for cols in group_slices(w.shape[1], scheme.group_size):
            scale, zero = fit_grid(w[:, cols], scheme, mse=self.mse)
            codes[:, cols] = quantize_to_codes(w[:, cols], scale[:, None], zero[:, None], scheme.maxq).to(torch.uint8)
            scales.append(scale)
            zeros.append(zero)
        return IntQuantizedTensor(
            codes=codes,
            scales=torch.stack(scales, dim=1).to(torch.float16),
            zeros=torch.stack(zeros, dim=1).to(torch.uint8),
            scheme=scheme,
        )

    def options(self) -> dict:
        return asdict(self)
