"""AWQ: activation-aware per-channel weight scaling, searched per input, then a clipping search (Lin et al. 2024).

Per decoder block, on the full-precision block's inputs (AWQ propagates full-precision outputs):

- **Scale search**, for each scaled input (:func:`~quantkit.transforms.scaling.scale_sites`): with ``x̄`` the
  mean ``|x|`` per channel over every calibration token and ``w̄`` the mean over rows of ``|w|`` normalised by
  its group's maximum, candidates ``s = x̄^r / w̄^(1-r)`` (normalised so ``max·min = 1``) for
  ``r = 0, 1/grid, …`` and the identity; the one whose quantized weights ``Q(W·s)/s`` give the output nearest
  (mean squared error) to the full-precision one wins. The output compared: q/k/v's own outputs, the attention
  output projection's, the whole MLP's for gate/up (down in float), down's. ``Q`` is round-to-nearest on the
  run's weight scheme (whatever the method that quantizes afterwards, as AWQ does for GPTQ).
- **Clipping search**, on the scaled weights of every linear but the query and key projections: per output
  row and group, the largest ``|w|`` kept is the group maximum times ``1 - i/grid`` (``i < grid/2``) that
  gives the group's partial output ``x_g · Q(clamp(w_g))`` nearest to ``x_g · w_g`` over 512 tokens.

The scales are folded (:mod:`quantkit.transforms.scaling`) and the weights clamped before any quantizer runs.
The outputs compared are evaluated on ``search_tokens`` tokens sampled from the calibration windows (AWQ uses
them all on a GPU; fewer keep the search to minutes on a CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from quantkit.engine.passes import (
    BlockInputs,
    InputStatistics,
    block_outputs,
    input_statistics,
    swapped_weights,
)
from quantkit.schemes import QuantScheme
from quantkit.transforms.base import Learned, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.rewrite import BlockRewrite, Heads, Rewrite, block_parameters, block_params
from quantkit.transforms.scaling import (
    ScaleSite,
    ScalingTransform,
    fake_quantize_weight,
    input_scale,
    site_statistic,
)

CPU_BUDGET = TrainingBudget(nsamples=64, seqlen=512, epochs=1, batch_size=8)
PAPER_BUDGET = TrainingBudget(nsamples=128, seqlen=512, epochs=1, batch_size=8)  # AWQ's 128 × 512 tokens
CLIP_TOKENS = 512  # tokens the clipping search compares on (AWQ's)
CLIP_MAX_SHRINK = 0.5  # the clipping search keeps at least half of each group's range (AWQ's)
CLIP_ROWS = 256  # output rows evaluated at once by the clipping search (bounds its memory)

Output = Callable[[list[torch.Tensor]], torch.Tensor]  # the compared output, given the readers' weights


def weight_mean(weight: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per input column, the mean over rows of ``|w|`` divided by its group's largest ``|w|``."""
    rows, cols = weight.shape
    scheme = scheme.for_columns(cols)
    size, groups = scheme.group_columns(cols), scheme.num_groups(cols)
    grouped = functional.pad(weight.abs().float(), (0, groups * size - cols)).reshape(rows, groups, size)
    normalised = grouped / grouped.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return normalised.reshape(rows, -1)[:, :cols].mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, grid: int) -> list[torch.Tensor]:
    """AWQ's candidates ``x̄^r / w̄^(1-r)`` for ``r = i/grid``, normalised to ``max·min = 1``, then the identity."""
    candidates = []
    for i in range(grid):
        ratio = i / grid
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp_min(1e-4)
        candidates.append(s / (s.max() * s.min()).sqrt())
    return [*candidates, torch.ones_like(x_mean)]


def best_scale(candidates: list[torch.Tensor], loss: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The candidate scale with the least ``loss`` (the first of equals)."""
    best, best_loss = candidates[0], float("inf")
    for s in candidates:
        value = float(loss(s))
        if value < best_loss:
            best, best_loss = s, value
    return best


def search_scale(x_mean: torch.Tensor, w_mean: torch.Tensor, weights: list[torch.Tensor], output: Output,
                 spread: Callable[[torch.Tensor], torch.Tensor], scheme: QuantScheme, grid: int) -> torch.Tensor:
    """AWQ's ``s`` (weights × s) among :func:`candidate_scales` whose ``Q(W·s)/s`` output is nearest to the
    full-precision one; ``spread`` maps a scale onto the weights' columns."""
    reference = output(weights)

    def loss(s: torch.Tensor) -> torch.Tensor:
        columns = spread(s)
        return (output([fake_quantize_weight(w * columns, scheme) / columns for w in weights]) - reference).pow(2).mean()

    return best_scale(candidate_scales(x_mean, w_mean, grid), loss)


def search_clip(weight: torch.Tensor, x: torch.Tensor, scheme: QuantScheme, grid: int) -> torch.Tensor:
    """AWQ's clipping: per output row and group of columns, the ``|w|`` bound (``[rows, groups]``) whose
    quantized group gives the partial output ``x_g · w_g`` with the least mean squared error."""
    rows, cols = weight.shape
    scheme = scheme.for_columns(cols)
    size, groups = scheme.group_columns(cols), scheme.num_groups(cols)
    pad = groups * size - cols
    w = weight.float()
    xg = functional.pad(x.float(), (0, pad)).reshape(x.shape[0], groups, size)
    amax = functional.pad(w.abs(), (0, pad)).reshape(rows, groups, size).amax(dim=-1)
    best_bound, best_err = amax.clone(), torch.full_like(amax, float("inf"))
    for i in range(int(CLIP_MAX_SHRINK * grid)):
        bound = amax * (1 - i / grid)
        limit = bound.repeat_interleave(size, dim=1)[:, :cols]
        delta = fake_quantize_weight(torch.maximum(torch.minimum(w, limit), -limit), scheme) - w
        delta = functional.pad(delta, (0, pad)).reshape(rows, groups, size)
        err = torch.cat([torch.einsum("tgc,ogc->ogt", xg, delta[start:start + CLIP_ROWS]).pow(2).mean(dim=-1)
                         for start in range(0, rows, CLIP_ROWS)])
        better = err < best_err
        best_err, best_bound = torch.where(better, err, best_err), torch.where(better, bound, best_bound)
    return best_bound


@dataclass
class AWQTransform(ScalingTransform):
    """AWQ; see the module docstring."""

    name = "awq"

    budget: TrainingBudget = CPU_BUDGET
    grid: int = 20
    clip: bool = True
    search_tokens: int = 2048

    def learn(self, ctx: TransformContext) -> Learned:
        adapter = ctx.adapter
        heads = Heads(*adapter.heads(ctx.model))
        generator = torch.Generator().manual_seed(ctx.seed)
        learned = Learned(Rewrite(None, []))

        def search_block(index: int, block: nn.Module, inputs: BlockInputs, sites: list[ScaleSite]) -> list[torch.Tensor]:
            rows = -(-self.search_tokens // len(inputs))
            with input_statistics(block, [site.observed for site in sites], rows, generator) as stats:
                outputs = block_outputs(block, inputs)
            params = block_params(block, torch.float32)
            scales = {site.field: 1 / self._scale(block, params, site, stats[site.observed], heads, ctx)
                      for site in sites}
            rewrite = BlockRewrite(**scales)
            learned.rewrite.blocks.append(rewrite)
            if self.clip:
                scaled = block_parameters(params, rewrite, None, adapter, heads)
                for site in sites:
                    x = stats[site.observed].sample()[:CLIP_TOKENS] * input_scale(scales[site.field], site, heads)
                    for name in clipped_readers(site, adapter.sites.value):
                        learned.weight_range[f"{adapter.blocks}.{index}.{name}"] = search_clip(
                            scaled[f"{name}.weight"], x, ctx.weight_scheme, self.grid)
            return outputs

        self.walk(ctx, search_block)
        return learned

    def _scale(self, block: nn.Module, params: dict[str, torch.Tensor], site: ScaleSite, stats: InputStatistics,
               heads: Heads, ctx: TransformContext) -> torch.Tensor:
        """AWQ's ``s`` for one site of ``block``."""
        scheme = ctx.weight_scheme
        weights = [params[f"{name}.weight"] for name in site.readers]
        x_mean = site_statistic(stats.mean_abs(), site, heads, "mean")
        w_mean = site_statistic(weight_mean(torch.cat(weights), scheme), site, heads, "mean")
        output = site_output(block, params, site, stats.sample())
        return search_scale(x_mean, w_mean, weights, output, lambda s: input_scale(s, site, heads), scheme, self.grid)


def clipped_readers(site: ScaleSite, value: str) -> tuple[str, ...]:
    """The site's linears whose ranges AWQ clips: all but the query and key projections (their error is
    amplified by the attention scores), i.e. of the attention inputs only the value projection."""
    return (value,) if value in site.readers and len(site.readers) > 1 else site.readers


def site_output(block: nn.Module, params: dict[str, torch.Tensor], site: ScaleSite, x: torch.Tensor) -> Output:
    """What the scale search compares for ``site`` on tokens ``x``: the output of the site's module (the MLP,
    with the readers' weights swapped in and the rest in float), else the readers' own outputs side by side."""
    if site.module is not None:
        module = block.get_submodule(site.module)

        def module_output(weights: list[torch.Tensor]) -> torch.Tensor:
            with torch.no_grad(), swapped_weights(block, dict(zip(site.readers, weights))):
                return module(x)

        return module_output
    biases = [params.get(f"{name}.bias") for name in site.readers]

    def own_outputs(weights: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([functional.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)

    return own_outputs
