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
    round_column: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    """GPTQ's column sweep over a batch of problems ``w [problems, rows, n]`` (float32, each in its quantization
    order; updated in place), with inverse Hessian factors ``hinv [problems, n, n]``, in torch on ``w``'s device.

    At the first column of every group, ``start_group(col, pending [problems, rows, group])`` sees the group's
    weights as updated so far. Each column is then replaced by ``round_column(col, values [problems, rows], d)``
    (``d [problems, 1]`` its diagonal entries of the factors) and the error ``(values - stored) / d`` is
    propagated to the later columns: at once inside a block, lazily to the columns after it. Every problem's
    arithmetic is the same whatever else the batch holds, so each comes out as it would alone.
    """
    n = w.shape[2]
    block = group_aligned_block(group)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, :, i1:i2].transpose(1, 2).contiguous()  # [problems, columns, rows]: each column contiguous
        err1 = torch.empty_like(w1)
        hinv1 = hinv[:, i1:i2, i1:i2]
        diag = hinv1.diagonal(dim1=1, dim2=2).unsqueeze(2).contiguous()  # [problems, columns, 1]
        # per column views, taken in one call each
        columns, errors, diagonals, factor_rows = w1.unbind(1), err1.unbind(1), diag.unbind(1), hinv1.unbind(1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                pending = w1[:, i : i + group].transpose(1, 2)
                if pending.shape[2] < group:  # the group runs past this block: take its later columns too
                    pending = torch.cat([pending, w[:, :, i2 : i2 + group - pending.shape[2]]], dim=2)
                start_group(col, pending)
            column, d = columns[i], diagonals[i]
            err = torch.sub(column, round_column(col, column, d), out=errors[i]).div_(d)
            w1[:, i + 1 :].addcmul_(factor_rows[i][:, i + 1 :, None], err[:, None, :], value=-1)
        for b in range(w.shape[0]):  # one GEMM per problem: the same arithmetic as alone
            w[b, :, i2:].addmm_(err1[b].t(), hinv[b, i1:i2, i2:], alpha=-1)


def solve_batches(weights: Sequence[torch.Tensor], stats: Sequence[LayerStats], stackable: bool) -> list[list[list[int]]]:
    """Layer indices as batches of problems: with ``stackable``, the layers sharing one Hessian object form one
    problem of their stacked rows and problems of one shape one batch; otherwise each layer is its own batch."""
    if not stackable:
        return [[[i]] for i in range(len(weights))]
    problems: dict[int, list[int]] = {}
    for i, layer in enumerate(stats):
        problems.setdefault(id(layer.hessian), []).append(i)
    batches: dict[tuple[int, int], list[list[int]]] = {}
    for members in problems.values():
        shape = (sum(weights[i].shape[0] for i in members), weights[members[0]].shape[1])
        batches.setdefault(shape, []).append(members)
    return list(batches.values())


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
        """Where the grid treats rows independently, layers that read one input (one Hessian object) are solved
        as one problem of their stacked rows, and problems of one shape (experts) as one batched sweep: every
        row's result is what it would be alone."""
        if any(layer.hessian is None for layer in stats):
            raise QuantkitError("GPTQ needs the layer's Hessian from calibration data")
        self.check_scheme(scheme)
        results: list[QuantizedTensor | None] = [None] * len(weights)
        for batch in solve_batches(weights, stats, rows_independent(scheme)):
            layers = [i for problem in batch for i in problem]
            problem_of = [b for b, problem in enumerate(batch) for _ in problem]
            rows = [weights[i].shape[0] for i in layers]
            weight = torch.stack([torch.cat([weights[i] for i in problem]) for problem in batch])
            clip = stacked_clip([stats[i] for i in layers], rows, weight.device)
            grid, codes, params, g_idx = self._solve(weight, [stats[problem[0]].hessian for problem in batch],
                                                     scheme, clip)
            layer_codes = codes.reshape(-1, codes.shape[2]).split(rows)
            layer_params = list(zip(*(p.reshape(-1, p.shape[2]).split(rows) for p in params)))
            for k, i in enumerate(layers):
                part = (layer_codes[k], layer_params[k], None if g_idx is None else g_idx[problem_of[k]])
                if len(layers) > 1:  # views of the batch's tensors: each layer gets storage of its own
                    part = tuple(_owned(value) for value in part)
                results[i] = grid.tensor(*part)
        return results  # type: ignore[return-value]

    def _solve(self, weight: torch.Tensor, hessians: Sequence[torch.Tensor], scheme: QuantScheme,
               clip: torch.Tensor | None) -> tuple[Grid, torch.Tensor, Params, torch.Tensor | None]:
        """The batched sweep of ``weight [problems, rows, in]`` (one Hessian per problem): its grid, codes
        ``[problems, rows, in]``, per-group parameters ``[problems, rows, groups]`` and ``g_idx [problems, in]``.
        The grid sees the problems' rows as the rows of one tensor."""
        problems, out_features, n = weight.shape
        group = scheme.group_columns(n)
        pinned = [without_dead_columns(w, h) for w, h in zip(weight, hessians)]
        flat = torch.stack([w for w, _ in pinned]).reshape(-1, n)
        grid = make_grid(scheme, flat, self.clipping(scheme), clip=clip)
        static = ([grid.fit(flat[:, cols], g) for g, cols in enumerate(scheme.group_slices(n))]
                  if self.static(scheme) else None)
        solved = [permuted_problem(w, h, self.order(h, group, static is not None), self.damp) for w, h in pinned]
        w, hinv, perm = (torch.stack(parts) for parts in zip(*solved))
        inverse = torch.argsort(perm, dim=1)

        def batched(params: Params) -> Params:  # [problems * rows, groups] -> [problems, rows, groups]
            return tuple(p.reshape(problems, out_features, -1) for p in params)

        batch = torch.arange(problems, device=w.device)[:, None]

        def along(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # values[b, r, index[b, j]]
            return values[batch, :, index].transpose(1, 2)  # indexing, not gather: it takes float8 scales too

        static_params = None if static is None else batched(_stack_groups(static))  # natural group order
        block = group_aligned_block(group)
        block_params: dict[int, list[Params]] = {}  # sweep block start -> each column's static grids

        def static_at(col: int) -> Params:
            """The static grids of sweep position ``col``, looked up a sweep block at a time."""
            start = col - col % block
            if start not in block_params:
                block_params.clear()
                index = perm[:, start : start + block] // group  # the natural group of each position
                block_params[start] = list(zip(*(along(p, index).unbind(2) for p in static_params)))
            return block_params[start][col - start]
        codes = torch.empty((problems, n, out_features), dtype=torch.uint8, device=w.device)  # column-major
        fitted: list[Params] = []  # grids of the groups in sweep order

        def start_group(col: int, pending: torch.Tensor) -> None:
            if static is None:  # a group's position matters only to grids that are never batched (GGUF)
                position = None if self.g_idx or problems > 1 else int(perm[0, col]) // group
                params = grid.fit(pending.reshape(-1, pending.shape[2]), position)  # rows of all problems
                fitted.append(tuple(p.reshape(problems, out_features) for p in params))

        def round_column(col: int, column: torch.Tensor, _d: torch.Tensor) -> torch.Tensor:
            params = fitted[col // group] if static_params is None else static_at(col)  # each [problems, rows]
            column_codes, values = grid.round(column[..., None], params)
            codes[:, col] = column_codes[..., 0]
            return values[..., 0]

        sweep_columns(w, hinv, group, start_group, round_column)
        codes = along(codes.transpose(1, 2), inverse).contiguous()
        if static_params is not None:
            params = static_params
        elif self.g_idx:
            params = batched(_stack_groups(fitted))
        else:  # contiguous groups, visited out of order: back to natural group order
            params = tuple(along(p, inverse[:, ::group] // group) for p in batched(_stack_groups(fitted)))
        reordered = self.column_groups(scheme) and scheme.group_size < n  # one group needs no g_idx
        return grid, codes, params, (inverse // group).to(torch.int32) if reordered else None


def _stack_groups(groups: Sequence[Params]) -> Params:
    """Per-group parameters (each shaped ``[..., rows]``) as ``[..., rows, groups]`` tensors."""
    return tuple(torch.stack(p, dim=-1) for p in zip(*groups))


def _owned(value: torch.Tensor | tuple | None) -> torch.Tensor | tuple | None:
    """A copy of ``value`` (a tensor, or a tuple of them) in storage of its own."""
    if isinstance(value, tuple):
        return tuple(t.clone() for t in value)
    return None if value is None else value.clone()
