"""Per-channel input scaling (AWQ, SmoothQuant): what the two share.

A scale on a linear's input channels is folded where that input is produced, so nothing runs at run time and
every checkpoint layout holds the result: the norm before q/k/v and before gate/up (its weight becomes the
scale, once the block norms are folded into the linears reading them), the value projection's rows for the
attention output's input, and up's rows for down's input. Under grouped-query attention the heads sharing a
key/value head share one scale per channel (the value rows carry it). The final norm and the head are left
alone, so a tied head stays tied.

Rewrite convention (:mod:`quantkit.transforms.rewrite`): the input becomes ``x · scale`` and the weight
``W / scale``; AWQ's and SmoothQuant's ``s`` (weight × s, input ÷ s) is ``1 / scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.engine.passes import BlockInputs, walk_blocks
from quantkit.formats.grid import make_grid, quantize_groups
from quantkit.models.adapters import ModelAdapter
from quantkit.progress import progress_bar
from quantkit.schemes import QuantScheme
from quantkit.transforms.base import RewriteTransform, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.prepare import fold_block_norms
from quantkit.transforms.rewrite import Heads


@dataclass(frozen=True)
class ScaleSite:
    """One input a block scales: the :class:`BlockRewrite` field that carries the scale, the linears reading
    the input (relative to the block), whether the scale is shared across the query heads of a key/value
    head (the attention output's input), and the module whose output shows the effect of quantizing the
    readers (the MLP for gate/up; None: the readers' own outputs)."""

    field: str
    readers: tuple[str, ...]
    per_kv_head: bool = False
    module: str | None = None

    @property
    def observed(self) -> str:
        """The linear whose input is observed for the site."""
        return self.readers[0]


def scale_sites(adapter: ModelAdapter) -> list[ScaleSite]:
    """The four inputs of a Llama-shaped block that take a folded scale."""
    sites = adapter.transform_sites()
    mlp = sites.down.rpartition(".")[0]
    return [ScaleSite("attention_scale", sites.attention_inputs),
            ScaleSite("value_scale", (sites.attention_output,), per_kv_head=True),
            ScaleSite("mlp_scale", sites.mlp_inputs, module=mlp or None),
            ScaleSite("up_scale", (sites.down,))]


def free_sites(sites: list[ScaleSite], ctx: TransformContext, index: int) -> list[ScaleSite]:
    """The sites of block ``index`` whose readers have no online input map from an earlier transform: a scale
    folded in front of one would be mixed by it."""
    prefix = f"{ctx.adapter.blocks}.{index}."
    return [site for site in sites if not any(prefix + reader in ctx.online for reader in site.readers)]


def per_kv_head(channels: torch.Tensor, heads: Heads, reduce: str) -> torch.Tensor:
    """``[heads·head_dim]`` per-channel values reduced (``mean`` or ``amax``) over the query heads sharing each
    key/value head: ``[kv_heads·head_dim]``."""
    grouped = channels.reshape(heads.kv_heads, heads.heads // heads.kv_heads, heads.head_dim)
    return getattr(grouped, reduce)(dim=1).reshape(-1)


def per_query_head(scale: torch.Tensor, heads: Heads) -> torch.Tensor:
    """A ``[kv_heads·head_dim]`` scale spread over the query heads' channels, as the attention output reads them."""
    groups = heads.heads // heads.kv_heads
    return scale.reshape(heads.kv_heads, -1).repeat_interleave(groups, dim=0).reshape(-1)


def site_statistic(channels: torch.Tensor, site: ScaleSite, heads: Heads, reduce: str) -> torch.Tensor:
    """A per-channel statistic of the site's input in the channels its scale has."""
    return per_kv_head(channels, heads, reduce) if site.per_kv_head else channels


def input_scale(scale: torch.Tensor, site: ScaleSite, heads: Heads) -> torch.Tensor:
    """The site's scale over every channel of the readers' input."""
    return per_query_head(scale, heads) if site.per_kv_head else scale


def fake_quantize_weight(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """``weight [out, in]`` rounded to the nearest point of ``scheme``'s grid (min-max, RTN) and decoded."""
    scheme = scheme.for_columns(weight.shape[1])
    return quantize_groups(make_grid(scheme, weight.float()), weight.float())[2]


BlockVisit = Callable[[int, nn.Module, BlockInputs, list[ScaleSite]], list[torch.Tensor]]


class ScalingTransform(RewriteTransform):
    """A transform that only scales input channels (:func:`scale_sites`): nothing is left at run time."""

    budget: TrainingBudget

    def walk(self, ctx: TransformContext, visit: BlockVisit) -> None:
        """``visit(index, block, inputs, sites)`` every decoder block in turn, on its full-precision inputs from
        the budget's calibration windows, with the sites it may scale (:func:`free_sites`); a visit returns the
        block's outputs."""
        sites = scale_sites(ctx.adapter)
        calib = ctx.calibration(self.budget.nsamples, self.budget.seqlen)
        blocks = ctx.adapter.get_blocks(ctx.model)
        with progress_bar() as progress:
            task = progress.add_task(self.name, total=len(blocks))

            def step(index: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
                progress.update(task, description=f"{self.name} block {index + 1}/{len(blocks)}")
                outputs = visit(index, block, inputs, free_sites(sites, ctx, index))
                progress.advance(task)
                return outputs

            walk_blocks(ctx.model, ctx.adapter, calib, self.budget.batch_size, step)

    def has_online(self) -> bool:
        return False

    def prepare(self, ctx: TransformContext) -> None:
        """Only the block norms are folded: the scales become their weights; embeddings stay tied."""
        fold_block_norms(ctx.model, ctx.adapter)
