"""What the engine, exporter and loader need to know of an architecture, as data: where the decoder blocks are,
which linears of a block share an input, which are routed experts, what stays in float, and how the stored
names differ from the module names. The declarations themselves are in :mod:`quantkit.models.architectures`;
this module turns one into the linears of a given block. All names are the names checkpoints store tensors
under (see :func:`quantkit.models.experts.stored_modules`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class ExpertsSpec:
    """A routed mixture of experts inside a block.

    transformers keeps the experts of ``path`` as two stacked tensors (gate and up concatenated, then down);
    quantkit rebuilds that module as one small MLP per expert whose linears are named ``gate``, ``up`` and
    ``down`` (as the checkpoints on the hub store them), so each expert's linears are ordinary linears.
    """

    path: str = "mlp.experts"
    router: str = "mlp.gate"  # never quantized: its scores pick the experts
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """One expert's linears, relative to the expert, grouped by the input they share."""
        return (self.gate, self.up), (self.down,)


@dataclass(frozen=True)
class TransformSites:
    """Where transforms act: the norm before each half of the block, the linears reading it, and the value,
    attention-output, up and down projections (relative to the block)."""

    attention_norm: str
    attention_inputs: tuple[str, ...]
    value: str
    attention_output: str
    mlp_norm: str
    mlp_inputs: tuple[str, ...]
    up: str
    down: str


@dataclass(frozen=True)
class ModelAdapter:
    """One architecture family's declaration.

    ``groups`` lists the dense linears in the order the forward pass reaches them; the linears of one group
    read the same input tensor, so they share one Hessian and are quantized together. A block holds each group
    whole or not at all (a DeepSeek block has either a dense MLP or experts; V2 has ``q_proj``, V3 ``q_a_proj``).
    Every linear of a block must be in a group, an expert or ``keep_float``: a linear the declaration does not
    place is refused, so a declaration cannot silently leave one out.
    """

    name: str
    groups: tuple[tuple[str, ...], ...]
    experts: ExpertsSpec | None = None
    keep_float: tuple[str, ...] = ()  # linears of a block that stay in float (e.g. a shared expert's gate)
    sites: TransformSites | None = None  # None: no transform applies
    # (attribute, stored name) of a block's modules that checkpoints store under another name than transformers'
    # attribute: the module is registered under the stored name (the attribute still reaches it), so module
    # names and stored tensor names are one.
    renamed: tuple[tuple[str, str], ...] = ()
    blocks: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def transform_sites(self) -> TransformSites:
        """Where transforms act, or a clear error for an architecture they do not apply to."""
        if self.sites is None:
            raise QuantkitError(f"transforms do not apply to architecture {self.name!r} (its norms or fused "
                                "projections are not the Llama shape they rewrite)")
        return self.sites

    def linear_names(self) -> list[str]:
        """Every dense linear the declaration names, relative to the block, in execution order."""
        return [name for group in self.groups for name in group]

    def block_groups(self, block: nn.Module) -> list[tuple[str, ...]]:
        """The dense groups ``block`` holds (whole), in execution order."""
        present = {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}
        return [group for group in self.groups if all(name in present for name in group)]

    def expert_count(self, block: nn.Module) -> int:
        """How many routed experts ``block`` holds (0 for a dense block)."""
        if self.experts is None:
            return 0
        try:
            experts = block.get_submodule(self.experts.path)
        except AttributeError:
            return 0
        return len(experts) if isinstance(experts, nn.ModuleList) else experts.num_experts

    def expert_groups(self, block: nn.Module) -> list[tuple[str, ...]]:
        """Each routed expert's linears in ``block``, relative to the block, one tuple per expert."""
        if not self.expert_count(block):
            return []
        spec = self.experts
        return [tuple(f"{spec.path}.{e}.{name}" for group in spec.linear_groups() for name in group)
                for e in range(self.expert_count(block))]

    def input_groups(self, block: nn.Module) -> list[tuple[str, ...]]:
        """The quantized linears of ``block`` grouped by the input tensor they read: the dense groups, then each
        expert's groups."""
        groups = list(self.block_groups(block))
        if self.expert_count(block):
            spec = self.experts
            groups += [tuple(f"{spec.path}.{e}.{name}" for name in group)
                       for e in range(self.expert_count(block)) for group in spec.linear_groups()]
        return groups

    def block_linear_names(self, block: nn.Module) -> list[str]:
        """The linears of ``block`` the engine quantizes, relative to it: dense groups, then the experts."""
        names = [name for group in self.block_groups(block) for name in group]
        return names + [name for expert in self.expert_groups(block) for name in expert]

    def check_block(self, block: nn.Module, prefix: str) -> None:
        """Refuse a block holding a linear the declaration does not place, or placing one twice."""
        placed = self.block_linear_names(block)
        if len(set(placed)) != len(placed):
            raise QuantkitError(f"the {self.name} declaration places a linear of {prefix} in two groups")
        known = set(placed) | set(self.keep_float)
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name not in known:
                raise QuantkitError(f"{prefix}.{name} is a linear the {self.name} declaration does not place "
                                    "(in a group, an expert or keep_float); this model is not the supported shape")

    def quantizable_layers(self, model: nn.Module) -> list[str]:
        """Full names of every linear the engine quantizes."""
        return [f"{self.blocks}.{i}.{name}" for i, block in enumerate(self.get_blocks(model))
                for name in self.block_linear_names(block)]

    def heads(self, model: nn.Module) -> tuple[int, int, int]:
        """``(attention heads, key/value heads, head dim)`` from the model's config."""
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim
