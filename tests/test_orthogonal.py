"""Orthogonal sampling, tangent projection, Cayley retraction and RiemannianAdam against float64 references."""

from __future__ import annotations

import torch

from quantkit.transforms.orthogonal import (
    RiemannianAdam,
    cayley_retraction,
    orthogonality_error,
    random_orthogonal,
    tangent_projection,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_loss(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """A non-quadratic smooth function of ``x``."""
    return torch.sin(x @ a).sum() + (x**3).sum()


def reference_step(
    x: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One RiemannianAdam step written with ``X skew(X^T G)`` and an explicit inverse (betas 0.9/0.999)."""

    def proj(at: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        s = at.T @ u
        return at @ ((s - s.T) / 2)

    g = proj(x, grad)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    d = proj(x, (m / (1 - 0.9**step)) / ((v / (1 - 0.999**step)).sqrt() + 1e-8))
    w = d @ x.T - x @ d.T
    eye = torch.eye(x.shape[0], dtype=torch.float64)
    x_new = torch.linalg.inv(eye + lr / 2 * w) @ (eye - lr / 2 * w) @ x
    return x_new, proj(x_new, m), v


def test_random_orthogonal_is_orthogonal_and_seeded() -> None:
    q = random_orthogonal(64, gen(0))
    assert q.dtype == torch.float64 and q.shape == (64, 64)
    assert (q.T @ q - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-12
    assert orthogonality_error(q) < 1e-12
    assert torch.equal(q, random_orthogonal(64, gen(0)))
    assert (q - random_orthogonal(64, gen(1))).abs().max() > 0.1
    assert random_orthogonal(8, gen(0), dtype=torch.float32).dtype == torch.float32


def test_random_orthogonal_sign_fix_gives_centred_entries() -> None:
    """Haar matrices have E[Q_00] = 0; unfixed Householder QR makes Q_00 = -|a_00|/|a_0| always negative."""
    g = gen(2)
    q00 = torch.stack([random_orthogonal(3, g)[0, 0] for _ in range(2000)])
    assert abs(q00.mean().item()) < 0.05
    assert abs((q00**2).mean().item() - 1 / 3) < 0.03


def test_orthogonality_error_measures_deviation() -> None:
    q = random_orthogonal(16, gen(3))
    q[:, 0] *= 1.001
    assert abs(orthogonality_error(q) - (1.001**2 - 1)) < 1e-12


def test_tangent_projection_is_tangent_and_idempotent() -> None:
    x = random_orthogonal(32, gen(4))
    grad = torch.randn(32, 32, generator=gen(5), dtype=torch.float64)
    t = tangent_projection(x, grad)
    assert (x.T @ t + t.T @ x).abs().max() < 1e-10
    assert (tangent_projection(x, t) - t).abs().max() < 1e-12
    # Orthogonal projection: the removed part x sym(x^T grad) is orthogonal to every tangent vector.
    other = tangent_projection(x, torch.randn(32, 32, generator=gen(6), dtype=torch.float64))
    assert abs(((grad - t) * other).sum().item()) < 1e-10


def test_cayley_descent_step_matches_finite_difference() -> None:
    n = 24
    x = random_orthogonal(n, gen(7)).requires_grad_(True)
    a = torch.randn(n, n, generator=gen(8), dtype=torch.float64)
    loss = smooth_loss(x, a)
    (grad,) = torch.autograd.grad(loss, x)
    x = x.detach()
    d = tangent_projection(x, grad)

    # Central difference along the retraction curve t -> R(x, d, t): slope is -2 <grad, d> = -2 |d|^2.
    h = 1e-5
    forward, backward = (
        smooth_loss(cayley_retraction(x, d, h), a),
        smooth_loss(cayley_retraction(x, d, -h), a),
    )
    slope = (forward - backward) / (2 * h)
    expected = -2 * (grad * d).sum()
    assert abs(slope.item() / expected.item() - 1) < 1e-6
    assert abs((grad * d).sum().item() / (d * d).sum().item() - 1) < 1e-10

    x_new = cayley_retraction(x, d, 1e-3)
    assert orthogonality_error(x_new) < 1e-12
    assert smooth_loss(x_new, a) < loss.detach()


def test_optimizer_matches_reference_steps() -> None:
    n = 16
    x0 = random_orthogonal(n, gen(9))
    target = random_orthogonal(n, gen(10))
    p = torch.nn.Parameter(x0.clone())
    opt = RiemannianAdam([p], lr=0.05)
    x, m, v = x0.clone(), torch.zeros(n, n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    for step in range(1, 4):
        opt.zero_grad()
        ((p - target) ** 4).sum().backward()
        grad = p.grad.clone()
        opt.step()
        x, m, v = reference_step(x, grad, m, v, step, lr=0.05)
        assert (p.detach() - x).abs().max() < 1e-12
    assert (opt.state[p]["exp_avg"] - m).abs().max() < 1e-12
    assert (opt.state[p]["exp_avg_sq"] - v).abs().max() < 1e-12


def test_optimizer_recovers_rotation_float32() -> None:
    n, cols = 128, 256
    g = gen(11)
    target = random_orthogonal(n, g)
    x0 = random_orthogonal(n, g)
    if torch.linalg.det(target) * torch.linalg.det(x0) < 0:
        target[:, 0] = -target[:, 0]  # the Cayley retraction never changes the determinant
    a = torch.randn(n, cols, generator=g, dtype=torch.float64)
    a32, b32 = a.float(), (target @ a).float()
    p = torch.nn.Parameter(x0.float())
    opt = RiemannianAdam([p], lr=0.02)

    def loss() -> torch.Tensor:
        return ((p @ a32 - b32) ** 2).sum()

    start = loss().item()
    for _ in range(200):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert p.dtype == torch.float32
    assert orthogonality_error(p) < 1e-5
    assert loss().item() < 1e-2 * start
    assert (p.detach().double() - target).norm() < 1e-2 * (x0 - target).norm()


def test_stabilize_reorthonormalises() -> None:
    """Cayley steps preserve X^T X, so an initial deviation stays unless ``stabilize`` projects it away."""
    x0 = random_orthogonal(16, gen(12)) * (1 + 1e-4)
    results = {}
    for stabilize in (None, 1):
        p = torch.nn.Parameter(x0.clone())
        opt = RiemannianAdam([p], lr=0.01, stabilize=stabilize)
        p.grad = torch.randn(16, 16, generator=gen(13), dtype=torch.float64)
        opt.step()
        results[stabilize] = orthogonality_error(p)
    assert results[None] > 1e-4
    assert results[1] < 1e-12


def test_param_groups_and_skipped_params() -> None:
    a, b, c = (torch.nn.Parameter(random_orthogonal(8, gen(s))) for s in (14, 15, 16))
    before = [t.detach().clone() for t in (a, b, c)]
    opt = RiemannianAdam([{"params": [a]}, {"params": [b, c], "lr": 0.0}], lr=0.1)
    a.grad = torch.randn(8, 8, generator=gen(17), dtype=torch.float64)
    b.grad = torch.randn(8, 8, generator=gen(18), dtype=torch.float64)
    opt.step()
    assert (a.detach() - before[0]).abs().max() > 1e-3
    assert torch.allclose(b.detach(), before[1], atol=1e-15)
    assert torch.equal(c.detach(), before[2]) and c not in opt.state
    assert opt.state[b]["step"] == 1
