"""MergeQuant-style static activations: per-channel static steps merged into the layers before (Wang et al. 2025).

A static per-channel activation quantizer ``round(x_j / Δ_j)·Δ_j`` costs nothing at run time when ``1/Δ_j`` is
folded where the input is produced (the norm, the value rows, up's rows) and ``Δ_j`` into the readers' weight
columns (MergeQuant's quantization step migration): the merged input then takes one static per-tensor scale,
which ``--act-static`` calibrates after the weights are quantized, and no per-token quantization runs.

Merging every channel's full range (``Δ_j ∝ max|X_j|``) pushes the activations' outlier channels into the
weights' columns, and 4-bit weights cannot hold them. MergeQuant balances that with dimensional reconstruction
and adaptive clipping; here, as a searched balance that keeps every layer's shape (so every checkpoint layout
and runtime reads the result): per scaled input (:func:`~quantkit.transforms.scaling.scale_sites`), candidates
``Δ = max|X|^r / max|W|^(1-r)`` (``r`` on a grid, ``r = 1`` the full migration, and the identity), the winner
the one whose output with both quantizers on (round-to-nearest weights ``Q(W·Δ)`` on the run's scheme, the
merged input rounded with one static scale the ``mse`` observer chooses on :data:`SCALE_TOKENS` tokens) is
nearest to the full-precision output; then AWQ's weight clipping search on the merged weights. Dimensional reconstruction (splitting channels,
which widens the layers) and MergeQuant's low-rank compensation are not implemented.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.actcalib import mse_bound
from quantkit.actquant import STATIC_FORMATS, quantize_static, static_limit
from quantkit.engine.passes import InputStatistics
from quantkit.errors import QuantkitError
from quantkit.formats.grid import MIN_SCALE
from quantkit.schemes import QuantScheme
from quantkit.transforms.awq import CPU_BUDGET, AWQTransform, best_scale, candidate_scales, site_output
from quantkit.transforms.base import Learned, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.rewrite import Heads
from quantkit.transforms.scaling import ScaleSite, fake_quantize_weight, input_scale, site_statistic

BUDGET = CPU_BUDGET
SCALE_TOKENS = 128  # tokens whose merged input chooses each candidate's static scale in the search


@dataclass
class MergeQuantTransform(AWQTransform):
    """MergeQuant-style merged static activation steps; see the module docstring."""

    name = "mergequant"

    budget: TrainingBudget = BUDGET

    def check(self, act_scheme: QuantScheme | None) -> None:
        if act_scheme is None or act_scheme.format not in STATIC_FORMATS or act_scheme.group_size != -1:
            raise QuantkitError("transform mergequant merges static activation steps into the weights: it needs "
                                "int or fp8 activations without groups (--act-bits with --act-static)")

    def learn(self, ctx: TransformContext) -> Learned:
        self.check(ctx.act_scheme)
        return super().learn(ctx)

    def _scale(self, block: nn.Module, params: dict[str, torch.Tensor], site: ScaleSite, stats: InputStatistics,
               heads: Heads, ctx: TransformContext) -> torch.Tensor:
        """The merged step ``Δ`` (weights × Δ, input ÷ Δ) for one site of ``block``."""
        weights = [params[f"{name}.weight"] for name in site.readers]
        x_max = site_statistic(stats.abs_max, site, heads, "amax")
        w_max = site_statistic(torch.cat(weights).abs().amax(dim=0), site, heads, "amax")
        x = stats.sample()
        reference = site_output(block, params, site, x)(weights)
        act, limit = ctx.act_scheme, static_limit(ctx.act_scheme)

        def loss(step: torch.Tensor) -> torch.Tensor:
            columns = input_scale(step, site, heads)
            merged = x / columns
            scale = (mse_bound(merged[:SCALE_TOKENS].abs().reshape(-1, 1), act) / limit).clamp_min(MIN_SCALE)
            rounded = quantize_static(merged, act, scale) * columns
            quantized = [fake_quantize_weight(w * columns, ctx.weight_scheme) / columns for w in weights]
            return (site_output(block, params, site, rounded)(quantized) - reference).pow(2).mean()

        return best_scale(candidate_scales(x_max, w_max, self.grid), loss)
