"""FlatQuant: learned affine transforms per block, trained block by block to match the full-precision output.

Per decoder block (the paper's placement; sizes from :func:`~quantkit.formats.kron.decompose_dim`, e.g.
576 = 24 ⊗ 24 and 1536 = 32 ⊗ 48; the attention output uses heads ⊗ head_dim):

- an online Kronecker affine map ``P = P1 ⊗ P2`` on the input of q/k/v, of gate/up, of the attention output
  and of down; each factor is ``U diag(σ) Vᵀ`` with ``U, V`` kept orthogonal by torch's Cayley
  parametrization, so ``P⁻ᵀ = U diag(1/σ) Vᵀ`` needs no inversion and is fused into the weights;
- per-channel scales (SmoothQuant initialisation, α = 0.3) before the q/k/v and gate/up maps, fused into
  the norms, and before down, fused into up's rows;
- learnable clipping: one ratio per output row of every weight (LWC), one per activation quantizer (LAC),
  kept for the quantizer and the served model.

Training (``cali_flat_quant``): inputs and targets are the full-precision block's (FP inputs propagate);
loss is the MSE to the target, divided by its own detached value; AdamW with the clipping logits at 10× the
lr and a cosine schedule. The CPU budget (8 windows × 512 tokens, 4 epochs, batches of 2) trains
SmolLM2-135M in about 4.5 minutes on 2 cores; ``budget="paper"`` gives the paper's 128 × 2048 and 15 epochs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils.parametrizations import orthogonal

from quantkit.engine import block_output
from quantkit.engine.passes import BlockInputs, block_outputs, input_ranges, train_steps, walk_blocks
from quantkit.formats.kron import Kron, decompose_dim
from quantkit.models.adapters import ModelAdapter
from quantkit.progress import progress_bar
from quantkit.schemes import QuantScheme
from quantkit.transforms.base import Learned, RewriteTransform, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.orthogonal import random_orthogonal
from quantkit.transforms.rewrite import (
    BlockRewrite,
    Heads,
    Rewrite,
    block_parameters,
    block_params,
    detach_rewrite,
)
from quantkit.transforms.simquant import SimQuantizer
from quantkit.transforms.training import (
    InputMap,
    cosine_schedule,
    epoch_means,
    map_inputs,
    require_float32,
    smooth_init,
)


class SVDMatrix(nn.Module):
    """An invertible ``n×n`` matrix ``U diag(σ) Vᵀ`` (``U, V`` orthogonal by parametrization)."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        super().__init__()
        self.u = orthogonal(nn.Linear(n, n, bias=False), orthogonal_map="cayley")
        self.v = orthogonal(nn.Linear(n, n, bias=False), orthogonal_map="cayley")
        self.u.weight = random_orthogonal(n, generator).float()
        self.v.weight = random_orthogonal(n, generator).float()
        self.sigma = nn.Parameter(torch.ones(n))

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, P⁻ᵀ)``."""
        u, v = self.u.weight, self.v.weight
        return (u * self.sigma) @ v.T, (u / self.sigma) @ v.T


class KronAffine(nn.Module):
    """``P1 ⊗ P2`` of two :class:`SVDMatrix` factors."""

    def __init__(self, sizes: tuple[int, int], generator: torch.Generator) -> None:
        super().__init__()
        self.left, self.right = SVDMatrix(sizes[0], generator), SVDMatrix(sizes[1], generator)

    def kron(self) -> Kron:
        (left, left_it), (right, right_it) = self.left.pair(), self.right.pair()
        return Kron(left, right, left_it, right_it)


def _key(name: str) -> str:
    return name.replace(".", "/")


class FlatBlock(nn.Module):
    """One block's learnable transforms and clipping ratios."""

    def __init__(self, block: nn.Module, adapter: ModelAdapter, heads: Heads, ranges: dict[str, torch.Tensor],
                 weight_scheme: QuantScheme, act_scheme: QuantScheme | None, alpha: float,
                 generator: torch.Generator) -> None:
        super().__init__()
        self.adapter = adapter
        hidden = block.get_submodule(adapter.sites.attention_inputs[0]).in_features
        intermediate = block.get_submodule(adapter.sites.down).in_features
        self.attention = KronAffine(decompose_dim(hidden), generator)
        self.output = KronAffine((heads.heads, heads.head_dim), generator)
        self.mlp = KronAffine(decompose_dim(hidden), generator)
        self.down = KronAffine(decompose_dim(intermediate), generator)

        def scale(readers: tuple[str, ...], range_of: str) -> nn.Parameter:
            w_amax = torch.stack([block.get_submodule(r).weight.detach().abs().amax(dim=0) for r in readers]).amax(dim=0)
            return nn.Parameter(smooth_init(w_amax, ranges[range_of], alpha))

        self.attention_scale = scale(adapter.sites.attention_inputs, adapter.sites.attention_inputs[0])
        self.mlp_scale = scale(adapter.sites.mlp_inputs, adapter.sites.mlp_inputs[0])
        self.up_scale = scale((adapter.sites.down,), adapter.sites.down)
        self.weight_quant = nn.ModuleDict({
            _key(n): SimQuantizer(weight_scheme, rows=block.get_submodule(n).out_features) for n in adapter.linear_names()
        })
        self.act_quant = nn.ModuleDict(
            {} if act_scheme is None else {g: SimQuantizer(act_scheme) for g in dict.fromkeys(self.input_groups().values())}
        )

    def input_groups(self) -> dict[str, str]:
        """Linear name → the name of the map on its input (shared by linears that read the same tensor)."""
        a = self.adapter.sites
        groups = {n: "attention" for n in a.attention_inputs} | {a.attention_output: "output"}
        return groups | {n: "mlp" for n in a.mlp_inputs} | {a.down: "down"}

    def rewrite(self) -> BlockRewrite:
        return BlockRewrite(
            attention_scale=self.attention_scale, attention_online=self.attention.kron(),
            output_online=self.output.kron(),
            mlp_scale=self.mlp_scale, mlp_online=self.mlp.kron(),
            up_scale=self.up_scale, down_online=self.down.kron(),
        )

    def input_map(self, linear: str, online: dict[str, Kron]) -> InputMap:
        group = self.input_groups()[linear]
        quant = self.act_quant[group] if len(self.act_quant) else None

        def apply(x: torch.Tensor) -> torch.Tensor:
            x = online[group].apply(x)
            return quant(x) if quant is not None else x

        return apply

    def clips(self, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Learned ratios by full layer name: per output row for weights, one per layer for activations."""
        weight = {f"{prefix}.{n}": self.weight_quant[_key(n)].ratio().detach().clone() for n in self.adapter.linear_names()}
        acts = {}
        if len(self.act_quant):
            acts = {f"{prefix}.{n}": self.act_quant[g].ratio().item() for n, g in self.input_groups().items()}
        return weight, acts

    def param_groups(self, lr: float, clip_lr: float) -> list[dict]:
        clip = [p for n, p in self.named_parameters() if n.endswith("clip_logit") and p.requires_grad]
        rest = [p for n, p in self.named_parameters() if not n.endswith("clip_logit")]
        return [{"params": rest, "lr": lr}, {"params": clip, "lr": clip_lr}]


CPU_BUDGET = TrainingBudget(nsamples=8, seqlen=512, epochs=4, batch_size=2)
PAPER_BUDGET = TrainingBudget(nsamples=128, seqlen=2048, epochs=15, batch_size=4)


@dataclass
class FlatQuantTransform(RewriteTransform):
    """FlatQuant (Sun et al. 2024), trained block by block; see the module docstring."""

    name = "flatquant"

    budget: TrainingBudget = CPU_BUDGET
    lr: float = 5e-3
    clip_lr_factor: float = 10.0
    alpha: float = 0.3

    def learn(self, ctx: TransformContext) -> Learned:
        model, adapter = ctx.model, ctx.adapter
        require_float32(model, self.name)
        generator = torch.Generator().manual_seed(ctx.seed)
        heads = Heads(*adapter.heads(model))
        calib = ctx.calibration(self.budget.nsamples, self.budget.seqlen)
        blocks = adapter.get_blocks(model)
        steps = self.budget.steps
        learned = Learned(Rewrite(None, []))
        first, last = [], []
        observed = (adapter.sites.attention_inputs[0], adapter.sites.mlp_inputs[0], adapter.sites.down)
        with progress_bar() as progress:
            task = progress.add_task("flatquant block 1", total=len(blocks) * steps)

            def train_block(i: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
                """Fit block ``i``'s transform to its full-precision outputs, which feed the next block."""
                with input_ranges(block, observed) as ranges:
                    targets = block_outputs(block, inputs)
                flat = FlatBlock(block, adapter, heads, ranges, ctx.weight_scheme, ctx.act_scheme, self.alpha, generator)
                losses = self._train(block, flat, heads, list(zip(inputs, targets)), steps, lambda _step, loss: progress.update(
                    task, advance=1, description=f"flatquant block {i + 1}/{len(blocks)} loss {loss:.3g}"))
                block_first, block_last = epoch_means(losses, len(inputs))
                first.append(block_first)
                last.append(block_last)
                learned.rewrite.blocks.append(detach_rewrite(flat.rewrite()))
                weight_clip, act_clip = flat.clips(f"{adapter.blocks}.{i}")
                learned.weight_clip.update(weight_clip)
                learned.act_clip.update(act_clip)
                return targets

            walk_blocks(model, adapter, calib, self.budget.batch_size, train_block)
        learned.stats = {"block_mse_first_epoch": sum(first) / len(first), "block_mse_last_epoch": sum(last) / len(last)}
        return learned

    def _train(self, block: nn.Module, flat: FlatBlock, heads: Heads, pairs: list, steps: int,
               report: Callable[[int, float], object]) -> list[float]:
        """``steps`` AdamW steps on (block input, full-precision output) ``pairs``; the losses."""
        opt = torch.optim.AdamW(flat.param_groups(self.lr, self.lr * self.clip_lr_factor), weight_decay=0.0)
        schedule = cosine_schedule(opt, steps)
        prepared = block_params(block)
        online: dict[str, Kron] = {}

        def step(pair: tuple) -> float:
            (h, kw), target = pair
            rewrite = flat.rewrite()
            online.update(attention=rewrite.attention_online, output=rewrite.output_online,
                          mlp=rewrite.mlp_online, down=rewrite.down_online)
            params = block_parameters(prepared, rewrite, None, flat.adapter, heads)
            for name in flat.adapter.linear_names():
                params[f"{name}.weight"] = flat.weight_quant[_key(name)](params[f"{name}.weight"])
            loss = nn.functional.mse_loss(block_output(functional_call(block, params, (h,), kw)), target)
            opt.zero_grad()
            (loss / loss.detach()).backward()
            opt.step()
            schedule.step()
            return loss.item()

        handles = map_inputs(block, {n: flat.input_map(n, online) for n in flat.input_groups()})
        try:
            return train_steps(pairs, steps, step, report)
        finally:
            for handle in handles:
                handle.remove()

