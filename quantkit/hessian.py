"""Accumulating ``H = 2/n * sum(x x^T)`` over calibration tokens at a linear layer's input."""

from __future__ import annotations

import torch

_TRIANGLE_BLOCKS = 8


def gram_upper(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for ``x`` of shape ``[tokens, features]``, computing only the upper block triangle.

    The lower triangle of the result is left at zero; :meth:`HessianAccumulator.hessian` mirrors it.
    Skipping the lower blocks saves about a third of the multiply-adds of a full product. The column slices of
    ``x`` go to the GEMM as they are, as transposed operands, with no transposed copy of ``x``.
    """
    n = x.shape[1]
    bounds = [n * i // _TRIANGLE_BLOCKS for i in range(_TRIANGLE_BLOCKS + 1)]
    out = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            out[a:b, a:] = x[:, a:b].t() @ x[:, a:]
    return out


# Tokens per bfloat16 Gram product: each product's result is rounded to bfloat16 (8 bits of mantissa) before
# the float64 sum, so shorter products keep the total's relative error near 2^-9 / sqrt(products).
BFLOAT16_PRODUCT_TOKENS = 1024


class HessianAccumulator:
    """Sums per-batch Gram matrices into a float64 total: float32 products of whole batches, or with
    ``product_dtype`` bfloat16 products of :data:`BFLOAT16_PRODUCT_TOKENS` tokens (twice as fast where the CPU
    has AVX512-BF16 or AMX)."""

    def __init__(self, features: int, device: torch.device | str = "cpu",
                 product_dtype: torch.dtype = torch.float32) -> None:
        self.total = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.product_dtype = product_dtype

    def add(self, x: torch.Tensor) -> None:
        """Add a batch of inputs ``[..., features]``."""
        x = x.reshape(-1, x.shape[-1]).to(self.product_dtype)
        chunks = [x] if self.product_dtype == torch.float32 else x.split(BFLOAT16_PRODUCT_TOKENS)
        for chunk in chunks:
            self.total += gram_upper(chunk)
        self.tokens += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """The symmetric float64 Hessian ``2/n * sum(x x^T)``."""
        upper = torch.triu(self.total)
        return (upper + torch.triu(upper, diagonal=1).t()) * (2.0 / max(self.tokens, 1))
