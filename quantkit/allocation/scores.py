"""Layer importance without quantizing: LIM and ZD from the layer-wise quantization paper (Dumitru et al.).

LIM (layer input modification): ``-cos(h_in, h_out)`` of a decoder block's residual stream, averaged over
calibration tokens; a block that changes its input more matters more. ZD (z-score distribution): the
fraction of a unit's weights more than one standard deviation above their mean; a unit with more such large
weights matters more.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.engine.passes import BlockInputs, block_outputs, walk_blocks
from quantkit.models.adapters import ModelAdapter


def lim_scores(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int = 4) -> list[float]:
    """LIM of every decoder block, in ``[-1, 1]``, averaged over every calibration token."""
    sums: list[float] = []

    def visit(_index: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
        outputs = block_outputs(block, inputs)
        cos = [torch.nn.functional.cosine_similarity(h.float(), out.float(), dim=-1) for (h, _), out in zip(inputs, outputs)]
        sums.append(-sum(float(c.sum()) for c in cos))
        return outputs

    walk_blocks(model, adapter, calib, batch_size, visit)
    return [s / calib.numel() for s in sums]


def zd_score(weights: list[torch.Tensor]) -> float:
    """Fraction of the weights (all tensors together) whose z-score exceeds 1."""
    flat = torch.cat([w.detach().float().flatten() for w in weights])
    std = float(flat.std())
    return float(((flat - flat.mean()) > std).float().mean()) if std > 0 else 0.0
