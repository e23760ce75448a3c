"""Square orthogonal matrices: Haar sampling and Riemannian Adam on St(n, n) with a Cayley retraction.

Used to learn rotations (as in SpinQuant) that stay exactly orthogonal while a loss is minimised.
All manifold arithmetic runs in float64; parameters keep their own dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "RiemannianAdam",
    "cayley_retraction",
    "orthogonality_error",
    "random_orthogonal",
    "tangent_projection",
]


def _qr_orthonormalize(a: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``a = QR`` with columns signed so that ``diag(R) > 0`` (unique for full rank ``a``)."""
    q, r = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1
    return q * signs


def random_orthogonal(
    n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """A Haar-distributed random ``n x n`` orthogonal matrix (sign-fixed QR of a float64 Gaussian)."""
    gaussian = torch.randn(n, n, generator=generator, dtype=torch.float64)
    return _qr_orthonormalize(gaussian).to(dtype)


def orthogonality_error(q: torch.Tensor) -> float:
    """``max |Q^T Q - I|`` over all entries, computed in float64."""
    q64 = q.detach().to(torch.float64)
    eye = torch.eye(q64.shape[1], dtype=torch.float64, device=q64.device)
    return (q64.T @ q64 - eye).abs().max().item()


def tangent_projection(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Project ``g`` onto the tangent space at orthogonal ``x``: ``g - x sym(x^T g)`` (embedded metric).

    The result ``t`` satisfies ``x^T t + t^T x = 0``.
    """
    xtg = x.T @ g
    return g - x @ ((xtg + xtg.T) / 2)


def cayley_retraction(x: torch.Tensor, direction: torch.Tensor, lr: float) -> torch.Tensor:
    """Move orthogonal ``x`` against tangent ``direction``: ``(I + lr/2 W)^-1 (I - lr/2 W) x``, ``W = d x^T - x d^T``.

    ``W`` is skew, so the factor applied to ``x`` is an exact rotation (determinant 1). For square ``x`` and
    tangent ``d`` the first-order step is ``x - 2 lr d``.
    """
    w = direction @ x.T - x @ direction.T
    half = (lr / 2) * w
    eye = torch.eye(x.shape[0], dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye + half, (eye - half) @ x)


class RiemannianAdam(torch.optim.Optimizer):
    """Adam for square orthogonal ``[n, n]`` parameters, keeping them on the orthogonal group.

    Per step, in float64: Riemannian gradient ``g = tangent_projection(X, G)``; Adam moments ``m``
    (of ``g``) and ``v`` (of ``g * g``, elementwise), bias-corrected; direction ``m_hat / (sqrt(v_hat) + eps)``
    projected onto the tangent space at ``X``; Cayley retraction with step ``lr``; ``m`` is then
    transported by projecting it onto the tangent space at the new point. With ``stabilize=k`` every
    ``k``-th step also re-orthonormalises the parameter by sign-fixed QR, removing accumulated rounding.
    Parameters must start orthogonal; those without a gradient are skipped.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        stabilize: int | None = None,
    ) -> None:
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}")
        if stabilize is not None and stabilize < 1:
            raise ValueError(f"stabilize must be a positive number of steps or None, got {stabilize}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "stabilize": stabilize})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Take one optimisation step; ``closure`` re-evaluates the loss as in other optimizers."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dim() != 2 or p.shape[0] != p.shape[1]:
                    raise ValueError(f"RiemannianAdam needs square [n, n] parameters, got {tuple(p.shape)}")
                x = p.detach().to(torch.float64)
                g = tangent_projection(x, p.grad.to(torch.float64))
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(x)
                    state["exp_avg_sq"] = torch.zeros_like(x)
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = exp_avg / (1 - beta1**step)
                v_hat = exp_avg_sq / (1 - beta2**step)
                direction = tangent_projection(x, m_hat / (v_hat.sqrt() + group["eps"]))
                x_new = cayley_retraction(x, direction, group["lr"])
                if group["stabilize"] is not None and step % group["stabilize"] == 0:
                    x_new = _qr_orthonormalize(x_new)
                exp_avg.copy_(tangent_projection(x_new, exp_avg))
                p.copy_(x_new)
        return loss
