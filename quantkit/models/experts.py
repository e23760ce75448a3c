"""Routed experts as one small MLP per expert.

transformers stores a block's experts as two stacked parameters (``gate_up_proj`` of ``[experts, 2 * inner,
hidden]``, gate rows first, and ``down_proj`` of ``[experts, hidden, inner]``); a quantizer, a checkpoint layout
and a kernel want ordinary linears. :func:`stored_modules` swaps each such module for :class:`RoutedExperts`,
which computes the same function with one :class:`ExpertMLP` per expert, each seeing only the tokens routed to
it. The linears carry the names checkpoints store them under, so nothing else needs renaming.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ExpertsSpec, ModelAdapter


class ExpertMLP(nn.Module):
    """One expert: ``down(act(gate(x)) * up(x))``, its linears named as ``spec`` says."""

    def __init__(self, spec: ExpertsSpec, hidden: int, inner: int, act_fn: nn.Module, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.names = (spec.gate, spec.up, spec.down)
        for name, (out_features, in_features) in zip(self.names, ((inner, hidden), (inner, hidden), (hidden, inner))):
            self.add_module(name, nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device))
        self.act_fn = act_fn

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """What the down projection reads: ``act(gate(x)) * up(x)``."""
        gate, up, _ = (getattr(self, name) for name in self.names)
        return self.act_fn(gate(x)) * up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.names[2])(self.inner(x))


class RoutedExperts(nn.ModuleList):
    """The experts of one block; called as transformers calls its stacked experts module: with the tokens'
    hidden states ``[tokens, hidden]``, the chosen experts ``[tokens, k]`` and their weights ``[tokens, k]``."""

    @property
    def num_experts(self) -> int:
        return len(self)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tokens, slot = torch.where(top_k_index == e)
            if tokens.numel():
                routed = expert(hidden_states[tokens]) * top_k_weights[tokens, slot, None]
                out.index_add_(0, tokens, routed.to(out.dtype))
        return out


def stored_modules(model: nn.Module, adapter: ModelAdapter) -> None:
    """Arrange ``model``'s blocks as checkpoints store them: modules that ``adapter`` renames are registered under
    their stored names, and stacked experts become :class:`RoutedExperts` holding the same weights (parameters
    on the meta device stay there). Idempotent."""
    for block in adapter.get_blocks(model):
        for attribute, stored in adapter.renamed:
            if attribute in block._modules:
                module = block._modules.pop(attribute)
                block.register_module(stored, module)
                object.__setattr__(block, attribute, module)  # the block's forward still finds it, unregistered
        if adapter.experts is not None:
            _unstack(block, adapter.experts)


def _unstack(block: nn.Module, spec: ExpertsSpec) -> None:
    try:
        stacked = block.get_submodule(spec.path)
    except AttributeError:
        return  # a dense block
    if not isinstance(stacked, RoutedExperts):
        owner, _, attr = spec.path.rpartition(".")
        block.get_submodule(owner).register_module(attr, _unstacked(stacked, spec))


def _unstacked(stacked: nn.Module, spec: ExpertsSpec) -> RoutedExperts:
    gate_up, down = getattr(stacked, "gate_up_proj", None), getattr(stacked, "down_proj", None)
    if not isinstance(gate_up, torch.Tensor) or gate_up.dim() != 3 or not isinstance(down, torch.Tensor) \
            or getattr(stacked, "has_bias", False):
        raise QuantkitError(f"{type(stacked).__name__} is not the stacked experts module quantkit reads "
                            "(gate_up_proj [experts, 2*inner, hidden], down_proj [experts, hidden, inner], no bias)")
    count, double_inner, hidden = gate_up.shape
    inner = double_inner // 2
    experts = RoutedExperts()
    for e in range(count):
        expert = ExpertMLP(spec, hidden, inner, stacked.act_fn, gate_up.dtype, gate_up.device)
        if not gate_up.is_meta:
            gate, up, down_linear = (getattr(expert, name) for name in expert.names)
            gate.weight.data.copy_(gate_up.data[e, :inner])
            up.weight.data.copy_(gate_up.data[e, inner:])
            down_linear.weight.data.copy_(down.data[e])
        experts.append(expert)
    return experts
