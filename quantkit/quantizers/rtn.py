"""Round-to-nearest: each group's grid from its own range (optionally searched), no calibration."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantkit.formats.base import QuantizedTensor
from quantkit.formats.grid import make_grid, quantize_groups
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.schemes import QuantScheme


@dataclass
class RTNQuantizer(Quantizer):
    """Min-max round-to-nearest per group; ``mse`` searches a clipping ratio (integer grids) or a block scale
    (float formats) per row and group."""

    name = "rtn"
    needs_calibration = False

    mse: bool = False

    def quantize(self, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> QuantizedTensor:
        grid = make_grid(scheme, weight.float(), self.mse, clip=stats.clip)
        codes, params, _ = quantize_groups(grid, weight)
        return grid.tensor(codes, params)

    def options(self, scheme: QuantScheme) -> dict:
        return asdict(self)
