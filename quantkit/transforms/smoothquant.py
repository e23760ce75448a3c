"""SmoothQuant: migrate activation outliers into the weights with per-channel scales, for W8A8.

Per input channel ``j`` of each scaled input (:func:`~quantkit.transforms.scaling.scale_sites`: q/k/v, the
attention output, gate/up and down), ``s_j = max|X_j|^α / max|W_j|^(1-α)`` over the calibration tokens and
the rows of every linear reading the input; the input is divided by ``s`` and the weights' columns multiplied
by it, folded (nothing runs at run time). ``α`` (``alpha``, migration strength) 0.5 splits the range evenly;
larger moves more of it into the weights. Statistics come from the full-precision model, block by block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.engine.passes import BlockInputs, block_outputs, input_ranges
from quantkit.transforms.base import Learned, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.rewrite import BlockRewrite, Heads, Rewrite
from quantkit.transforms.scaling import ScaleSite, ScalingTransform, site_statistic
from quantkit.transforms.training import smooth_init

BUDGET = TrainingBudget(nsamples=128, seqlen=512, epochs=1, batch_size=8)  # SmoothQuant's 512 × 512 pile tokens, fewer


@dataclass
class SmoothQuantTransform(ScalingTransform):
    """SmoothQuant (Xiao et al. 2023); see the module docstring."""

    name = "smoothquant"

    budget: TrainingBudget = BUDGET
    alpha: float = 0.5

    def learn(self, ctx: TransformContext) -> Learned:
        heads = Heads(*ctx.adapter.heads(ctx.model))
        rewrite = Rewrite(None, [])

        def smooth_block(_index: int, block: torch.nn.Module, inputs: BlockInputs,
                         sites: list[ScaleSite]) -> list[torch.Tensor]:
            with input_ranges(block, [site.observed for site in sites]) as ranges:
                outputs = block_outputs(block, inputs)
            scales = {}
            for site in sites:
                weights = torch.cat([block.get_submodule(r).weight.detach().float() for r in site.readers])
                w_amax = site_statistic(weights.abs().amax(dim=0), site, heads, "amax")
                x_amax = site_statistic(ranges[site.observed], site, heads, "amax")
                scales[site.field] = smooth_init(w_amax, x_amax, self.alpha)
            rewrite.blocks.append(BlockRewrite(**scales))
            return outputs

        self.walk(ctx, smooth_block)
        return Learned(rewrite)

