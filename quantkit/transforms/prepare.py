"""What every transform needs first: untied embeddings and norm scales folded into the linears after them.

Both steps preserve the function exactly. Afterwards every RMSNorm is weightless (its weight is all ones),
so it commutes with an orthogonal rotation of the residual stream: ``norm(h Q) = norm(h) Q``.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter


def untie_embeddings(model: nn.Module, adapter: ModelAdapter) -> None:
    """Give lm_head its own copy of the embedding matrix when the two are tied."""
    embeddings = model.get_submodule(adapter.embeddings)
    head = model.get_submodule(adapter.lm_head)
    if head.weight is embeddings.weight or head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False


def _fold(norm: nn.Module, linears: list[nn.Linear], name: str) -> None:
    weight = getattr(norm, "weight", None)
    if weight is None or getattr(norm, "bias", None) is not None:
        raise QuantkitError(f"{name} is not an RMSNorm with a weight; transforms need Llama-style norms")
    scale = weight.detach().double()
    for linear in linears:
        linear.weight.copy_((linear.weight.double() * scale).to(linear.weight.dtype))
    weight.fill_(1.0)


def fold_block_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Multiply each decoder block's norm weights into the columns of the linears reading them, then set the
    weights to ones (the final norm and the head are left alone: a tied head stays tied)."""
    with torch.no_grad():
        for i, block in enumerate(adapter.get_blocks(model)):
            for norm, readers in ((adapter.sites.attention_norm, adapter.sites.attention_inputs),
                                  (adapter.sites.mlp_norm, adapter.sites.mlp_inputs)):
                _fold(block.get_submodule(norm), [block.get_submodule(r) for r in readers], f"{adapter.blocks}.{i}.{norm}")


def fold_norms(model: nn.Module, adapter: ModelAdapter) -> None:
    """Multiply each norm's weight into the columns of the linears reading it, then set the weight to ones."""
    fold_block_norms(model, adapter)
    with torch.no_grad():
        _fold(model.get_submodule(adapter.final_norm), [model.get_submodule(adapter.lm_head)], adapter.final_norm)


def prepare(model: nn.Module, adapter: ModelAdapter) -> None:
    """Untie the embeddings and fold every norm (in place)."""
    untie_embeddings(model, adapter)
    fold_norms(model, adapter)
