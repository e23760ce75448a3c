"""``x @ W.T`` on CPU for weights decoded on the fly, a slab of output rows at a time (no float model copy)."""

from __future__ import annotations

from collections.abc import Callable

import torch

SLAB_BYTES = 16 * 1024 * 1024  # float32 dense rows decoded at a time


def slab_rows(in_features: int, multiple: int = 1) -> int:
    """Rows per slab: about :data:`SLAB_BYTES` of float32 weights, a multiple of ``multiple``."""
    rows = max(1, SLAB_BYTES // (4 * in_features)) // multiple * multiple
    return max(multiple, rows)


def slab_matmul(x: torch.Tensor, out_features: int, rows: int, dense_rows: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """``x [m, in] @ W.T`` (float32) where ``dense_rows(begin, end)`` decodes rows ``begin:end`` of ``W``."""
    y = torch.empty(x.shape[0], out_features)
    for begin in range(0, out_features, rows):
        end = min(begin + rows, out_features)
        torch.mm(x, dense_rows(begin, end).t(), out=y[:, begin:end])
    return y
