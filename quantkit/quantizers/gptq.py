"""GPTQ: column-by-column rounding with Hessian-based error feedback (Frantar et al., 2022).

Per layer: dead inputs are pinned, columns are optionally visited in decreasing Hessian-diagonal order
(act-order), the damped Hessian is inverted in float64 and its upper Cholesky factor drives the error
updates, processed in blocks with lazy batch updates of the remaining columns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorPlan
from quantkit.formats.grid import Grid, Params, make_grid, rows_independent
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.schemes import QuantScheme

log = logging.getLogger(__name__)

_DAMP_RETRIES = 6
_FIRST_RETRY_DAMP = 0.01


def damping_schedule(damp: float) -> list[float]:
    """The damping asked for, then ten times more at each retry (from 0.01 when 0 was asked for)."""
    first_retry = damp * 10 if damp > 0 else _FIRST_RETRY_DAMP
    return [damp] + [first_retry * 10**i for i in range(_DAMP_RETRIES)]


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1`` in float64, returned as float32.

    With ``J`` the order-reversing permutation and ``J H J = M M^T`` (lower ``M``), the factor is
    ``J M^-1 J``: one Cholesky and one triangular inverse instead of inverting ``H`` and factoring the inverse.
    If the damped Hessian is not positive definite, the damping grows by :func:`damping_schedule`.
    """
    h = hessian.double().flip(0, 1)
    mean_diag = torch.diag(h).mean().item()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    schedule = damping_schedule(damp)
    for current in schedule:
        lower, info = torch.linalg.cholesky_ex(h + current * mean_diag * eye)
        if info == 0:
            upper = torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)
            if torch.isfinite(upper).all():
                if current != damp:
                    log.warning("Hessian needed damping %.3g (asked for %.3g)", current, damp)
                return upper.float()
    raise QuantkitError(f"Hessian is not positive definite even with damping {schedule[-1]:.3g}; use more calibration data")


def without_dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 weight and float64 Hessian copies in which inputs never seen (zero diagonal) are pinned."""
    w = weight.float().clone()
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    return w, h


def act_order_perm(h: torch.Tensor) -> torch.Tensor:
    """Columns in decreasing Hessian-diagonal order (act-order)."""
    return torch.argsort(torch.diag(h), descending=True, stable=True)


def group_aware_perm(h: torch.Tensor, group: int) -> torch.Tensor:
    """Act-order that keeps every group of ``group`` consecutive columns together (group-aware reordering,
    Gafni et al. 2025): groups in decreasing order of their largest Hessian diagonal, and each group's columns
    in decreasing diagonal order. A partial last group stays last, so every group starts at a multiple of
    ``group`` in the new order and the stored tensor needs no ``g_idx``."""
    n = h.shape[0]
    diag = torch.diag(h)
    full = n - n % group
    within = torch.argsort(diag[:full].reshape(-1, group), dim=1, descending=True, stable=True)
    order = torch.argsort(diag[:full].reshape(-1, group).amax(dim=1), descending=True, stable=True)
    starts = (order * group)[:, None]
    tail = full + torch.argsort(diag[full:], descending=True, stable=True)
    return torch.cat([(starts + within[order]).reshape(-1), tail]).to(h.device)


def stacked_clip(stats: Sequence[LayerStats], rows: Sequence[int], device: torch.device) -> torch.Tensor | None:
    """The clipping ratios per row of layers stacked along their rows (1 where a layer has none)."""
    if all(layer.clip is None for layer in stats):
        return None
    return torch.cat([torch.ones(count, device=device) if layer.clip is None else layer.clip.reshape(-1).float().to(device)
                      for layer, count in zip(stats, rows)])


def permuted_problem(
    w: torch.Tensor, h: torch.Tensor, perm: torch.Tensor | None, damp: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(w[:, perm], inverse Hessian factor in that order, perm)``; None is the natural order."""
    if perm is None:
        perm = torch.arange(h.shape[0], device=h.device)
    return w[:, perm], inverse_hessian_factor(h[perm][:, perm], damp), perm


# Act-order's default form by width (SmolLM2-135M, C4 128 x 512, WikiText-2 16 x 2048, scripts/bench_trunk.py):
# at 4 bits g64, static groups 25.98 < g_idx 26.87 < group-aware 27.22; at 3 bits g64, group-aware 60.15 while
# static groups fall to 80.30 (the grids fitted before the sweep no longer hold the updated weights).
STATIC_GROUPS_MIN_BITS = 4
# The MSE clipping search is on by default on integer grids below this width, where it pays for its time
# (SmolLM2-135M W3 g64: 60.36 without, see the README's issue-25 benchmark; at 4 bits it gained 1% for 1.4x the time).
MSE_BELOW_BITS = 4

SWEEP_BLOCK = 128  # columns per lazy-update block of the sweep: speed only, the arithmetic is the same


def group_aligned_block(group: int) -> int:
    """Columns per lazy-update block: a multiple of the group where possible, so that a group's grid is
    fitted after every earlier update has reached it."""
    return group * max(1, SWEEP_BLOCK // group) if group <= SWEEP_BLOCK else SWEEP_BLOCK


def sweep_columns(
    w: torch.Tensor,
    hinv: torch.Tensor,
    group: int,
    start_group: Callable[[int, torch.Tensor], None],
    round_column: Callable[[int, torch.Tensor, float], torch.Tensor],
) -> None:
    """GPTQ's column sweep over ``w [rows, n]`` (float32, in quantization order; updated in place), in torch on
    ``w``'s device.

    At the first column of every group, ``start_group(col, pending)`` sees the group's weights as updated so
    far. Each column is then replaced by ``round_column(col, values, d)`` (``d`` its diagonal entry of the
    inverse Hessian factor ``hinv``) and the error ``(values - stored) / d`` is propagated to the later
    columns: at once inside a block, lazily to the columns after it.
    """
    n = w.shape[1]
    block = group_aligned_block(group)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].t().contiguous()  # [columns, rows]: each column one contiguous row
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i, d in enumerate(hinv1.diagonal().tolist()):
            col = i1 + i
            if col % group == 0:
                pending = w1[i : i + group].t()
                if pending.shape[1] < group:  # the group runs past this block: take its later columns too
                    pending = torch.cat([pending, w[:, i2 : i2 + group - pending.shape[1]]], dim=1)
                start_group(col, pending)
            column = w1[i]
            err = torch.sub(column, round_column(col, column, d), out=err1[i]).div_(d)
            w1[i + 1 :].addr_(hinv1[i, i + 1 :], err, alpha=-1)
        w[:, i2:].addmm_(err1.t(), hinv[i1:i2, i2:], alpha=-1)


@dataclass
class GPTQQuantizer(Quantizer):
    """GPTQ with groups, act-order, static groups and a grid search (``mse``) as options, on any number format.

    Act-order has three forms, all visiting the columns with the largest Hessian diagonal first, two of them
    storing natural column order without ``g_idx`` (what vLLM and the float formats need). ``static_groups``
    fits every group's grid on the original weights before any update (llm-compressor's static order);
    without it, :func:`group_aware_perm` keeps each group's columns together and fits each group when the sweep
    reaches it; ``g_idx`` fits each group of ``group_size`` visited columns when the sweep reaches it and
    stores the group of every column (``desc_act``). ``static_groups`` None picks, without ``g_idx``, static
    groups from :data:`STATIC_GROUPS_MIN_BITS` bits and the group-aware order below; ``mse`` None searches
    integer grids below :data:`MSE_BELOW_BITS` bits.
    """

    name = "gptq"
    needs_calibration = True

    damp: float = 0.01
    act_order: bool = True
    static_groups: bool | None = None
    g_idx: bool = False
    mse: bool | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.damp:
            raise QuantkitError(f"damping must be a non-negative fraction of the mean Hessian diagonal, got {self.damp}")
        if self.g_idx and (self.static_groups or not self.act_order):
            raise QuantkitError("--g-idx stores act-order groups: it needs --act-order and no --static-groups")

    def static(self, scheme: QuantScheme) -> bool:
        """Whether group grids are fitted on the original weights before any update."""
        if self.static_groups is not None:
            return self.static_groups
        return self.act_order and not self.g_idx and scheme.bits >= STATIC_GROUPS_MIN_BITS

    def clipping(self, scheme: QuantScheme) -> bool:
        """Whether each group's grid is searched for its least-error clipping (``mse``)."""
        if self.mse is not None:
            return self.mse
        return scheme.format == "int" and scheme.bits < MSE_BELOW_BITS

    def options(self, scheme: QuantScheme) -> dict:
        return {**asdict(self), "static_groups": self.static(scheme), "mse": self.clipping(scheme)}

    def check_scheme(self, scheme: QuantScheme) -> None:
        super().check_scheme(scheme)
        if scheme.format != "int" and self.column_groups(scheme):
            raise QuantkitError(f"{scheme.format} blocks are contiguous along the input, so they cannot store "
                                "act-order groups; drop --g-idx")

    def column_groups(self, scheme: QuantScheme) -> bool:
        """Whether its tensors assign columns to groups out of order (act-order ``g_idx``)."""
        return self.g_idx and scheme.group_size != -1

    def plan(self, scheme: QuantScheme) -> TensorPlan:
        return replace(super().plan(scheme), column_groups=self.column_groups(scheme))

    def order(self, h: torch.Tensor, group: int, static: bool) -> torch.Tensor | None:
        """The column visiting order (None: natural)."""
        if not self.act_order:
            return None
        grouped = not (self.g_idx or static) and group < h.shape[0]
        return group_aware_perm(h, group) if grouped else act_order_perm(h)

    def quantize(self, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> QuantizedTensor:
        return self.quantize_together([weight], [stats], scheme)[0]

    def quantize_together(self, weights: Sequence[torch.Tensor], stats: Sequence[LayerStats],
                          scheme: QuantScheme) -> list[QuantizedTensor]:
        """Layers that read one input (one Hessian object) are solved as one problem of their stacked rows
        where the grid treats rows independently: every row's result is what it would be alone."""
        hessian = stats[0].hessian
        if hessian is None:
            raise QuantkitError("GPTQ needs the layer's Hessian from calibration data")
        self.check_scheme(scheme)
        stackable = rows_independent(scheme) and all(s.hessian is hessian for s in stats)
        if len(weights) > 1 and not stackable:
            return [self.quantize(weight, layer, scheme) for weight, layer in zip(weights, stats)]
        rows = [weight.shape[0] for weight in weights]
        weight = torch.cat(list(weights))
        grid, codes, params, g_idx = self._solve(weight, hessian, scheme, stacked_clip(stats, rows, weight.device))
        if len(rows) == 1:
            return [grid.tensor(codes, params, g_idx)]
        parts = zip(codes.split(rows), zip(*(p.split(rows) for p in params)))
        return [grid.tensor(part_codes.clone(), tuple(p.clone() for p in part_params),
                            None if g_idx is None else g_idx.clone())  # each layer owns its storage
                for part_codes, part_params in parts]

    def _solve(self, weight: torch.Tensor, hessian: torch.Tensor, scheme: QuantScheme,
               clip: torch.Tensor | None) -> tuple[Grid, torch.Tensor, Params, torch.Tensor | None]:
        """The sweep of one weight: its grid, codes ``[out, in]``, per-group parameters and ``g_idx``."""
        out_features, n = weight.shape
        group = scheme.group_columns(n)
        w, h = without_dead_columns(weight, hessian)
        grid = make_grid(scheme, w, self.clipping(scheme), clip=clip)
        static = ([grid.fit(w[:, cols], g) for g, cols in enumerate(scheme.group_slices(n))]
                  if self.static(scheme) else None)
        w, hinv, perm = permuted_problem(w, h, self.order(h, group, static is not None), self.damp)
        codes = torch.empty((n, out_features), dtype=torch.uint8, device=w.device)  # column-major while solving
        fitted: dict[int, Params] = {}  # sweep position of a group's first column -> its grid
        visited = perm.tolist()  # sweep position -> natural column

        def start_group(col: int, pending: torch.Tensor) -> None:
            if static is None:  # with g_idx the group's columns are not one block of the row: no position
                fitted[col] = grid.fit(pending, None if self.g_idx else visited[col] // group)

        def round_column(col: int, column: torch.Tensor, _d: float) -> torch.Tensor:
            params = static[visited[col] // group] if static is not None else fitted[col - col % group]
            column_codes, values = grid.round(column[:, None], params)
            codes[col] = column_codes[:, 0]
            return values[:, 0]

        sweep_columns(w, hinv, group, start_group, round_column)
        inverse = torch.argsort(perm)
        codes = codes.t()[:, inverse].contiguous()
        if static is not None:
            groups = static
        elif self.g_idx:
            groups = [fitted[col] for col in sorted(fitted)]
        else:  # contiguous groups, visited out of order: back to natural group order
            groups = [fitted[int(inverse[start]) - int(inverse[start]) % group] for start in range(0, n, group)]
        params = tuple(torch.stack(p, dim=1) for p in zip(*groups))
        reordered = self.column_groups(scheme) and scheme.group_size < n  # one group needs no g_idx
        return grid, codes, params, (inverse // group).to(torch.int32) if reordered else None
