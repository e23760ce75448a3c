"""Hadamard matrices checked directly: entries +-1 and H @ H.T == n * I exactly in float64."""

from __future__ import annotations

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.transforms.hadamard_matrix import (
    _PALEY_ORDERS,
    _small_hadamard,
    hadamard_factors,
    hadamard_matrix,
    is_hadamard_size,
)

SMALL_ORDERS = [12, 20, 24, 28, 36, 44, 48, 60, 68, 72, 76, 80, 84]


def assert_hadamard(h: torch.Tensor, n: int) -> None:
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert bool((h.abs() == 1).all())
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_small_orders_up_to_100() -> None:
    assert [k for k in _PALEY_ORDERS if k <= 100] == SMALL_ORDERS


@pytest.mark.parametrize("k", SMALL_ORDERS)
def test_small_paley_matrices(k: int) -> None:
    assert_hadamard(_small_hadamard(k), k)
    assert_hadamard(hadamard_matrix(k), k)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 36, 64, 576, 768, 896, 1536, 2048])
def test_hadamard_matrix(n: int) -> None:
    assert_hadamard(hadamard_matrix(n), n)


@pytest.mark.parametrize(
    ("n", "factors"),
    [
        (1, (1, 1)),
        (2, (1, 2)),
        (64, (1, 64)),
        (24, (12, 2)),
        (576, (36, 16)),
        (1536, (12, 128)),
        (896, (28, 32)),
        (5120, (20, 256)),
        (4864, (76, 64)),
    ],
)
def test_factors(n: int, factors: tuple[int, int]) -> None:
    assert hadamard_factors(n) == factors
    assert is_hadamard_size(n)


def test_large_size_rows_orthogonal() -> None:
    h = hadamard_matrix(5120)
    assert h.shape == (5120, 5120) and bool((h.abs() == 1).all())
    rows = torch.arange(0, 5120, 37)
    assert torch.equal(h[rows] @ h.T, 5120 * torch.eye(5120, dtype=torch.float64)[rows])


def test_kron_structure_and_dtype() -> None:
    h = hadamard_matrix(96, dtype=torch.float32)
    assert h.dtype == torch.float32
    assert torch.equal(h, torch.kron(_small_hadamard(12).float(), hadamard_matrix(8, torch.float32)))


def test_returns_fresh_tensor() -> None:
    hadamard_matrix(12).zero_()
    assert_hadamard(hadamard_matrix(12), 12)


@pytest.mark.parametrize("n", [0, 3, 6, 9, 14, 52, 92, 100, 23 * 256])
def test_unsupported_sizes(n: int) -> None:
    assert hadamard_factors(n) is None
    assert not is_hadamard_size(n)
    with pytest.raises(QuantkitError, match=rf"\b{n}\b"):
        hadamard_matrix(n)
