"""Unnormalised Hadamard matrices of order n = k * 2**p, built as kron(H_k, H_{2**p}).

H_{2**p} is Sylvester's matrix. H_k is 1 or comes from a Paley construction over the prime
field GF(q), with the Jacobsthal matrix Q[i, j] = chi(j - i) (chi the quadratic character mod q):

* Paley I, prime q = 3 (mod 4): Q is skew; with S = [[0, 1^T], [-1, Q]], H = I + S has order q + 1.
* Paley II, prime q = 1 (mod 4): Q is symmetric; with the conference matrix C = [[0, 1^T], [1, Q]],
  H = C kron [[1, 1], [1, -1]] + I kron [[1, -1], [-1, -1]] has order 2(q + 1).

Small orders k go up to 256; composite q (e.g. GF(25) for order 52) is not supported.
"""

from __future__ import annotations

from functools import cache

import torch

from quantkit.errors import QuantkitError

_MAX_SMALL_ORDER = 256


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q**0.5) + 1))


def _paley_orders() -> dict[int, tuple[int, int]]:
    """Order -> (q, kind) for every Paley order <= 256 that is not a power of two; Paley I wins ties."""
    orders: dict[int, tuple[int, int]] = {}
    for q in sorted(filter(_is_prime, range(3, _MAX_SMALL_ORDER)), key=lambda q: q % 4 == 1):
        kind = 1 if q % 4 == 3 else 2
        order = kind * (q + 1)
        if order <= _MAX_SMALL_ORDER and order & (order - 1):
            orders.setdefault(order, (q, kind))
    return dict(sorted(orders.items()))


_PALEY_ORDERS = _paley_orders()


def _jacobsthal(q: int) -> torch.Tensor:
    """The q x q matrix Q[i, j] = chi(j - i) over GF(q), q an odd prime."""
    chi = -torch.ones(q, dtype=torch.float64)
    chi[[x * x % q for x in range(1, q)]] = 1.0
    chi[0] = 0.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


@cache
def _small_hadamard(k: int) -> torch.Tensor:
    """H_k in float64 for k = 1 or a key of _PALEY_ORDERS; callers must not modify the cached tensor."""
    if k == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    q, kind = _PALEY_ORDERS[k]
    core = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    core[0, 1:] = 1.0
    core[1:, 0] = -1.0 if kind == 1 else 1.0
    core[1:, 1:] = _jacobsthal(q)
    if kind == 1:
        return torch.eye(q + 1, dtype=torch.float64) + core
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    d2 = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(core, h2) + torch.kron(torch.eye(q + 1, dtype=torch.float64), d2)


def _sylvester(m: int, dtype: torch.dtype) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order m, a power of two."""
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(k, 2**p) with n = k * 2**p and k = 1 or a Paley order, k smallest; None if there is none."""
    if n < 1:
        return None
    k = n
    while k % 2 == 0:
        k //= 2
    while k <= n:
        if k == 1 or k in _PALEY_ORDERS:
            return k, n // k
        k *= 2
    return None


def is_hadamard_size(n: int) -> bool:
    """Whether hadamard_matrix(n) can be built."""
    return hadamard_factors(n) is not None


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The n x n matrix kron(H_k, H_{2**p}) with entries +-1 and H @ H.T == n * I (not normalised)."""
    factors = hadamard_factors(n)
    if factors is None:
        raise QuantkitError(
            f"no Hadamard matrix of size {n}: need n = k * 2**p with k = 1 or a Paley order "
            f"<= {_MAX_SMALL_ORDER} over a prime field"
        )
    k, m = factors
    return torch.kron(_small_hadamard(k).to(dtype), _sylvester(m, dtype))
