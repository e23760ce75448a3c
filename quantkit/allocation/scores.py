"""Layer importance without quantizing: LIM and ZD from the layer-wise quantization paper (Dumitru et al.).

LIM (layer input modification): ``-cos(h_in, h_out)`` of a decoder block's residual stream, averaged over
calibration tokens; a block that changes its input more matters more. ZD (z-score distribution): the
fraction of a unit's weights more than one standard deviation above their mean; a unit with more such large
weights matters more.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.engine import block_output
from quantkit.models.adapters import ModelAdapter


class _LastBlockDone(Exception):
    """Ends a forward pass after the last decoder block."""


def lim_scores(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int = 4) -> list[float]:
    """LIM of every decoder block, in ``[-1, 1]``, averaged over every calibration token."""
    blocks = adapter.get_blocks(model)
    sums = [0.0] * len(blocks)
    tokens = 0
    entering: dict[int, torch.Tensor] = {}

    def before(i: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            entering[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i: int):
        def hook(_module: nn.Module, _args: tuple, _kwargs: dict, out: object) -> None:
            cos = torch.nn.functional.cosine_similarity(entering.pop(i).float(), block_output(out).float(), dim=-1)
            sums[i] -= float(cos.sum())
            if i == len(blocks) - 1:
                raise _LastBlockDone  # the head's logits are not needed
        return hook

    handles = [h for i, block in enumerate(blocks) for h in (
        block.register_forward_pre_hook(before(i), with_kwargs=True),
        block.register_forward_hook(after(i), with_kwargs=True),
    )]
    try:
        with torch.no_grad():
            for batch in calib.split(batch_size):
                try:
                    model(input_ids=batch.to(model.device), use_cache=False)
                except _LastBlockDone:
                    pass
                tokens += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return [s / tokens for s in sums]


def zd_score(weights: list[torch.Tensor]) -> float:
    """Fraction of the weights (all tensors together) whose z-score exceeds 1."""
    flat = torch.cat([w.detach().float().flatten() for w in weights])
    std = float(flat.std())
    return float(((flat - flat.mean()) > std).float().mean()) if std > 0 else 0.0
