"""QuaRot-style Hadamard rotations: fixed, nothing learned.

- Residual stream: a randomized Hadamard ``diag(±1) H / √n`` fused into the embeddings and every reader and
  writer (SmolLM2: 576 = 36·16).
- Values and attention output: a Hadamard per head, fused into the value rows and the output columns; across
  heads an online Hadamard on the output projection's input when the head count has one (9 heads does not:
  then only the per-head part, SpinQuant's R2).
- Down projection: an online Hadamard of the intermediate size as a Kronecker pair (1536 = 12 ⊗ 128), its
  transpose fused into the weight.

A size with no Hadamard matrix (see :mod:`quantkit.transforms.hadamard_matrix`) falls back to a random
orthogonal matrix, as QuaRot's ``random`` mode does; the online ones keep the Kronecker shape
(:func:`~quantkit.formats.kron.decompose_dim`) so they stay cheap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from quantkit.formats.kron import Kron, decompose_dim
from quantkit.transforms.base import Learned, RewriteTransform, TransformContext
from quantkit.transforms.hadamard_matrix import hadamard_factors, hadamard_matrix
from quantkit.transforms.orthogonal import random_orthogonal
from quantkit.transforms.rewrite import BlockRewrite, Rewrite


def orthonormal_hadamard(n: int, generator: torch.Generator, randomized: bool = False) -> torch.Tensor:
    """``H / √n`` (float64), rows multiplied by random signs when ``randomized``; random orthogonal when no
    Hadamard matrix of order ``n`` exists."""
    if hadamard_factors(n) is None:
        return random_orthogonal(n, generator)
    h = hadamard_matrix(n) / math.sqrt(n)
    if randomized:
        signs = torch.randint(0, 2, (n,), generator=generator).double() * 2 - 1
        h = signs[:, None] * h
    return h


def hadamard_kron(n: int, generator: torch.Generator) -> Kron:
    """An orthogonal ``n×n`` map as a Kronecker pair: ``H_k ⊗ H_2^p`` when ``n`` has a Hadamard matrix, random
    orthogonal factors of FlatQuant's sizes otherwise."""
    factors = hadamard_factors(n) or decompose_dim(n)
    return Kron.orthogonal(*(orthonormal_hadamard(f, generator) for f in factors))


@dataclass
class HadamardTransform(RewriteTransform):
    """QuaRot: randomized Hadamard on the residual stream, per-head on V/O, online before down_proj."""

    name = "hadamard"

    def learn(self, ctx: TransformContext) -> Learned:
        generator = torch.Generator().manual_seed(ctx.seed)
        model, adapter = ctx.model, ctx.adapter
        hidden = model.get_submodule(adapter.embeddings).weight.shape[1]
        heads, _, head_dim = adapter.heads(model)
        intermediate = adapter.get_blocks(model)[0].get_submodule(adapter.sites.down).in_features
        residual = orthonormal_hadamard(hidden, generator, randomized=True)
        head_rotation = orthonormal_hadamard(head_dim, generator)
        across_heads = None
        if heads > 1 and hadamard_factors(heads) is not None:
            across_heads = Kron.orthogonal(orthonormal_hadamard(heads, generator), torch.eye(head_dim, dtype=torch.float64))
        down = hadamard_kron(intermediate, generator)
        blocks = [BlockRewrite(head_rotation=head_rotation, output_online=across_heads, down_online=down)
                  for _ in adapter.get_blocks(model)]
        return Learned(Rewrite(residual, blocks))
