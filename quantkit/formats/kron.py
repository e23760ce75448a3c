"""Kronecker-factored linear maps on a layer's input: ``x ↦ x (L ⊗ R)`` computed as two small matmuls.

For ``x`` of length ``n1·n2`` read as an ``n1×n2`` matrix ``X`` (row-major), ``x (L ⊗ R) = vec(Lᵀ X R)``: a
``n1×n1`` and a ``n2×n2`` product per token instead of one ``n×n``. A single matrix is the case ``n1 = 1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Where a layer keeps its online map's factors (module buffers, checkpoint tensors ``{layer}.<name>``).
TRANSFORM_BUFFERS = ("input_transform_left", "input_transform_right")


def kron_apply(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``x [..., n1·n2] (left ⊗ right)``, in the dtype of the factors."""
    n1, n2 = left.shape[0], right.shape[0]
    grid = x.reshape(*x.shape[:-1], n1, n2)
    return (left.T @ grid @ right).reshape(x.shape)


def decompose_dim(n: int) -> tuple[int, int]:
    """FlatQuant's factor sizes: ``(a-b, a+b)`` for the smallest ``a ≥ √n`` with ``a² - n`` a perfect square."""
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        b = math.isqrt(a * a - n)
        if b * b == a * a - n:
            return a - b, a + b
        a += 1


@dataclass
class Kron:
    """An invertible map ``T = left ⊗ right`` with its inverse transpose, ``T⁻ᵀ = left_it ⊗ right_it``.

    The activation of a layer is multiplied by ``T`` at run time (online); its weight by ``T⁻ᵀ`` (fused) so the
    layer's output is unchanged. Orthogonal factors are their own inverse transposes.
    """

    left: torch.Tensor
    right: torch.Tensor
    left_it: torch.Tensor
    right_it: torch.Tensor

    @classmethod
    def orthogonal(cls, left: torch.Tensor, right: torch.Tensor) -> Kron:
        return cls(left, right, left, right)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x T`` along the last dimension."""
        return kron_apply(x, self.left, self.right)

    def fuse(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight T⁻ᵀ``: the weight that reads ``x T`` and gives the output it gave on ``x``."""
        return kron_apply(weight, self.left_it, self.right_it)

    def to(self, dtype: torch.dtype) -> Kron:
        return Kron(*(t.to(dtype) for t in (self.left, self.right, self.left_it, self.right_it)))

    @property
    def sizes(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[0]
