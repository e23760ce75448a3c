"""Block-by-block sequential quantization (GPTQ's driver), for any quantizer behind the one interface.

Calibration windows go through the embeddings once; then each decoder block, in order, sees the outputs of
the already-quantized blocks before it. Within a block, the Hessian of every group of linears that share an
input is accumulated over all windows, the group is quantized, and its weights are replaced in place by
their dequantized values (fake quantization), so what follows sees the quantization error.

True-sequential (the default) takes each group's statistics after the earlier groups of the same block were
quantized. It runs as a single forward pass per block: the batches advance in lockstep and meet at each
group, where the group is quantized once all batches contributed. Without it, statistics come from the
full-precision block (one pass), then the quantized block recomputes the outputs (a second pass).

The linears of a group that share one scheme are solved in one call, on the device the block runs on; routed
experts run in batches, one job per expert, so that a batch's experts reach each group together and are solved
in one call too (GPTQ sweeps them as one batch). Over
data-parallel ranks (:mod:`quantkit.distributed`) each rank runs its share of the windows; a group's Hessian
is summed over the ranks, and its linears are solved where :meth:`Ranks.owners` puts them and sent to all.
With a ``forward_dtype`` the forward passes run under autocast; statistics and solves never do.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from quantkit import defaults
from quantkit.distributed import SINGLE, Ranks
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.hessian import HessianAccumulator
from quantkit.lockstep import Lockstep
from quantkit.models.adapters import ModelAdapter
from quantkit.models.loading import check_finite
from quantkit.progress import progress_bar
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.schemes import QuantScheme

SchemeFor = Callable[[str], QuantScheme]
# Quantizes one linear: (full name, weight, statistics, scheme) -> quantized tensor.
LayerQuantizer = Callable[[str, torch.Tensor, LayerStats, QuantScheme], QuantizedTensor]
# Quantizes linears ready at the same time under one scheme: (full names, weights, statistics, scheme) -> tensors.
GroupQuantizer = Callable[[Sequence[str], Sequence[torch.Tensor], Sequence[LayerStats], QuantScheme],
                          list[QuantizedTensor]]


class _StopForward(Exception):
    """Ends a forward pass early once everything needed from it has been seen."""


@dataclass
class EngineOptions:
    true_sequential: bool = defaults.TRUE_SEQUENTIAL
    batch_tokens: int = 8192  # calibration tokens per forward batch
    weight_clip: dict[str, torch.Tensor] = field(default_factory=dict)  # learned clipping ratios per output row
    statistics: bool = False  # gather Hessians even for a quantizer that needs no calibration
    quantize_layer: LayerQuantizer | None = None  # replaces ``quantizer.quantize`` (it may record more choices)
    devices: tuple[torch.device, ...] = ()  # spread the blocks over these (each runs on its own); default: in place
    ranks: Ranks = SINGLE  # data-parallel ranks: windows split, Hessians summed, solves shared out
    forward_dtype: torch.dtype | None = None  # autocast of the blocks' calibration forwards (None: their own dtype)
    expert_min_tokens: int = defaults.EXPERT_MIN_TOKENS  # fewer routed tokens: the expert's statistics are forced
    expert_batch_bytes: int = defaults.EXPERT_BATCH_BYTES  # experts solved together keep their Hessians within this
    expert_tokens: dict[str, int] = field(default_factory=dict)  # filled in: calibration tokens routed to each expert

    def experts_record(self) -> dict | None:
        """What a run records of the routed experts it quantized (None for a dense model): how many, the
        starvation threshold, and each starved expert with the calibration tokens routed to it."""
        if not self.expert_tokens:
            return None
        starved = {name: n for name, n in self.expert_tokens.items() if n < self.expert_min_tokens}
        return {"count": len(self.expert_tokens), "min_tokens": self.expert_min_tokens, "starved": starved}


def full_precision(device: torch.device) -> torch.autocast:
    """No autocast: statistics and solves keep their float32/float64 arithmetic inside a bfloat16 forward."""
    return torch.autocast(device.type, enabled=False)


def _forward_precision(block: nn.Module, dtype: torch.dtype | None) -> torch.autocast:
    """Autocast of ``block``'s forward passes to ``dtype`` (none when None)."""
    return torch.autocast(next(block.parameters()).device.type, dtype=dtype, enabled=dtype is not None)


def _linear(block: nn.Module, name: str, full_name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise QuantkitError(f"{full_name} is a {type(module).__name__}, not a linear layer")
    return module


def linear_shapes(model: nn.Module, adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every linear the engine quantizes, by full name."""
    return {f"{adapter.blocks}.{i}.{name}": (linear.out_features, linear.in_features)
            for i, block in enumerate(adapter.get_blocks(model)) for name in adapter.block_linear_names(block)
            for linear in [block.get_submodule(name)]}


def check_layers(model: nn.Module, adapter: ModelAdapter, scheme_for: SchemeFor, values: bool = True) -> None:
    """Refuse up front what would fail half way: linears the declaration does not place, schemes that do not
    fit, and (``values``) non-finite weights."""
    for i, block in enumerate(adapter.get_blocks(model)):
        adapter.check_block(block, f"{adapter.blocks}.{i}")
        for name in adapter.block_linear_names(block):
            full = f"{adapter.blocks}.{i}.{name}"
            in_features = _linear(block, name, full).in_features
            scheme_for(full).for_columns(in_features).check_fits(full, in_features)
        if values:
            check_finite(block, f"{adapter.blocks}.{i}")


def _group_quantizer(quantizer: Quantizer, options: EngineOptions) -> GroupQuantizer:
    """The quantizer's batched solve, or ``options.quantize_layer`` one linear at a time when it is set."""
    layer = options.quantize_layer
    if layer is not None:
        return lambda names, weights, stats, scheme: [layer(*args, scheme) for args in zip(names, weights, stats)]
    return lambda _names, weights, stats, scheme: quantizer.quantize_together(weights, stats, scheme)


def quantize_linears(linears: dict[str, nn.Linear], stats: dict[str, LayerStats], quantize: GroupQuantizer,
                     scheme_for: SchemeFor, ranks: Ranks = SINGLE) -> dict[str, QuantizedTensor]:
    """Quantize linears ready at the same time (by full name), those under one scheme in one call, on the device
    their weights are on, and put each dequantized weight back in place. Over several ranks, each rank solves
    its share of the linears and every rank gets every result."""
    owner = dict(zip(linears, ranks.owners([linear.weight.numel() * linear.in_features for linear in linears.values()])))
    by_scheme: dict[QuantScheme, list[str]] = {}
    for full, linear in linears.items():
        if owner[full] == ranks.rank:
            by_scheme.setdefault(scheme_for(full).for_columns(linear.in_features), []).append(full)
    solved = {}
    for scheme, names in by_scheme.items():
        tensors = quantize(names, [linears[full].weight.data for full in names], [stats[full] for full in names], scheme)
        solved.update(zip(names, tensors))
    results = {}
    for full, linear in linears.items():
        results[full] = qt = ranks.share(solved.get(full), owner[full])
        linear.weight.data.copy_(qt.dequantize(linear.weight.dtype).to(linear.weight.device))
    return results


@dataclass
class Calibrated:
    """Calibration batches on their way through the blocks: the hidden states entering the next block, and the
    keyword arguments each block takes per batch (masks, position embeddings; they differ between blocks where
    layers alternate sliding and global attention, as in Gemma)."""

    hidden: list[torch.Tensor]  # per batch
    arguments: list[list[dict]]  # [block][batch]

    def entering(self, index: int) -> list[tuple[torch.Tensor, dict]]:
        """Per batch, the hidden states and block ``index``'s keyword arguments."""
        return list(zip(self.hidden, self.arguments[index]))


def capture_block_inputs(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int) -> Calibrated:
    """The hidden states entering block 0 and the keyword arguments of every block, per batch: the model runs
    with each block standing aside (returning its input untouched), so no block computes and blocks whose
    weights are not loaded yet take part."""
    blocks = adapter.get_blocks(model)
    captured = Calibrated([], [[] for _ in blocks])

    def stand_in(index: int):
        def forward(*args, **kwargs):
            if len(args) > 1:
                raise QuantkitError(f"{adapter.blocks}.{index} is called with positional arguments besides its "
                                    "input; the engine cannot replay it")
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                captured.hidden.append(hidden)
            captured.arguments[index].append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            if index == len(blocks) - 1:
                raise _StopForward
            return hidden

        return forward

    for index, block in enumerate(blocks):
        block.forward = stand_in(index)
    try:
        for batch in calib.split(batch_size):
            try:
                model(input_ids=batch.to(model.device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for block in blocks:
            del block.forward
    return captured


def block_output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index]


# Called by a statistics hook once a job's contribution is in, with what to do once every job's is.
Arrival = Callable[[Callable[[], None]], None]


class _GroupRun:
    """Statistics hooks for the dense linears of a block, or of a batch of experts that each run as one job: one
    Hessian per member and group of linears sharing an input, each group quantized (every member's linears in one
    call) once every job contributed to it."""

    def __init__(self, members: Sequence[tuple[nn.Module, str]], groups: Sequence[tuple[str, ...]],
                 quantize: GroupQuantizer, scheme_for: SchemeFor, results: dict[str, QuantizedTensor],
                 options: EngineOptions) -> None:
        self.members, self.groups = list(members), list(groups)  # (module, full name prefix)
        self.weight_clip, self.ranks = options.weight_clip, options.ranks
        # bfloat16 forwards: the Gram products of what the bfloat16 linears read, in bfloat16 too
        self.product_dtype = options.forward_dtype or torch.float32
        self.quantize, self.scheme_for, self.results = quantize, scheme_for, results
        self.accumulators: dict[tuple[int, int], HessianAccumulator] = {}  # (member, group) -> statistics
        self.seen: dict[tuple[int, int], tuple[int, torch.Size]] = {}  # (job, group) -> the input's identity

    def quantize_group(self, g: int) -> None:
        accumulators = [self.accumulators.pop((m, g)) for m in range(len(self.members))]
        with full_precision(accumulators[0].total.device):
            linears, stats = {}, {}
            for (module, prefix), acc in zip(self.members, accumulators):
                if self.ranks.world > 1:
                    acc.tokens = self.ranks.total(acc.tokens)
                    self.ranks.sum_(acc.total)
                hessian = acc.hessian()
                for name in self.groups[g]:
                    full = f"{prefix}.{name}"
                    linears[full] = _linear(module, name, full)
                    stats[full] = LayerStats(hessian=hessian, tokens=acc.tokens, clip=self.weight_clip.get(full))
            self.results.update(quantize_linears(linears, stats, self.quantize, self.scheme_for, self.ranks))

    def finish(self) -> None:
        """Quantize every group from the statistics gathered (the two-pass order)."""
        self.seen.clear()
        for g in range(len(self.groups)):
            self.quantize_group(g)

    def install(self, job_index: Callable[[], int], arrive: Arrival) -> list:
        """Hooks that accumulate each group's Hessian once per job, then ``arrive`` with its quantization."""
        return [_linear(module, name, f"{prefix}.{name}").register_forward_pre_hook(
                    self._hook(m, g, f"{prefix}.{name}", job_index, arrive))
                for m, (module, prefix) in enumerate(self.members)
                for g, group in enumerate(self.groups) for name in group]

    def _hook(self, m: int, g: int, full: str, job_index: Callable[[], int], arrive: Arrival):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (job_index(), g)
            identity = (x.data_ptr(), x.shape)
            first = self.seen.get(key)
            if first is None:
                self.seen[key] = identity
                acc = self.accumulators.get((m, g))
                if acc is None:
                    acc = self.accumulators[m, g] = HessianAccumulator(x.shape[-1], x.device, self.product_dtype)
                acc.add(x)  # products in the forward's own dtype: its autocast changes nothing of them
                arrive(lambda: self.quantize_group(g))
            elif first != identity:
                raise QuantkitError(f"{full} does not read the same input as the rest of its group; the adapter is wrong")

        return hook


def expert_batches(experts: nn.ModuleList, budget: int) -> list[range]:
    """Consecutive experts solved together: as many as keep their float64 Hessians of one group within
    ``budget`` bytes (at least one)."""
    widest = max(module.in_features for module in experts[0].modules() if isinstance(module, nn.Linear))
    size = max(1, budget // (8 * widest * widest))
    return [range(start, min(start + size, len(experts))) for start in range(0, len(experts), size)]


class _ExpertsRun:
    """The routed experts of a block: each job's tokens and routing are kept where they enter the experts; once
    all jobs arrived, the experts are solved in batches (:func:`expert_batches`), each expert one job of its
    batch's pass, fed only the tokens routed to it (a starved expert all of them)."""

    def __init__(self, experts: nn.ModuleList, prefix: str, groups: Sequence[tuple[str, ...]],
                 quantize: GroupQuantizer, scheme_for: SchemeFor, results: dict[str, QuantizedTensor],
                 options: EngineOptions) -> None:
        self.experts, self.prefix, self.groups, self.options = experts, prefix, groups, options
        self.quantize, self.scheme_for, self.results = quantize, scheme_for, results
        self.routed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # job -> (hidden [tokens, h], index [tokens, k])

    def install(self, job_index: Callable[[], int], arrive: Arrival) -> list:
        """A hook that keeps each job's tokens and routing, then ``arrive`` with the experts' solve."""
        def hook(_module: nn.Module, args: tuple) -> None:
            self.routed[job_index()] = (args[0], args[1])
            arrive(lambda: self.solve(True))

        return [self.experts.register_forward_pre_hook(hook)]

    def finish(self) -> None:
        """Solve the experts from the full-precision statistics gathered (the two-pass order)."""
        self.solve(False)

    def solve(self, true_sequential: bool) -> None:
        """Quantize every expert from its routed tokens, then forget them."""
        hidden = torch.cat([h.reshape(-1, h.shape[-1]) for h, _ in self.routed.values()])
        index = torch.cat([i.reshape(-1, i.shape[-1]) for _, i in self.routed.values()])
        self.routed.clear()
        for batch in expert_batches(self.experts, self.options.expert_batch_bytes):
            jobs, members = [], []
            for e in batch:
                chosen = (index == e).any(dim=-1)
                prefix, routed = f"{self.prefix}.{e}", self.options.ranks.total(int(chosen.sum()))
                self.options.expert_tokens[prefix] = routed
                tokens = hidden if routed < self.options.expert_min_tokens else hidden[chosen]
                jobs.append((self.experts[e], tokens, {}))
                members.append((self.experts[e], prefix))
            run = _GroupRun(members, self.groups, self.quantize, self.scheme_for, self.results, self.options)
            (_lockstep_pass if true_sequential else _two_pass)([run], jobs, self.options.forward_dtype)


class BlockSource(Protocol):
    """Where the engine gets each decoder block, and what becomes of it once quantized."""

    def __len__(self) -> int: ...

    def load(self, index: int) -> nn.Module:
        """Block ``index``, with its weights in place on the device it runs on."""

    def finish(self, index: int, quantized: dict[str, QuantizedTensor],
               outputs: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        """Take block ``index``'s quantized linears and its outputs (None without calibration); return the
        outputs the next block reads (the same, or copies spilled to disk; None after the last block)."""


def block_devices(count: int, devices: Sequence[torch.device]) -> list[torch.device]:
    """Contiguous runs of blocks over ``devices``, as even as the count allows (a balanced device map)."""
    return [devices[i * len(devices) // count] for i in range(count)]


def move_to(value: object, device: torch.device) -> object:
    """``value`` (a tensor, or tuples, lists and dicts of them) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        moved = [move_to(v, device) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else type(value)(moved)
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value


class ResidentBlocks:
    """The blocks of a model in memory; with ``devices``, each visits its device for its turn and returns."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, devices: Sequence[torch.device] = ()) -> None:
        self.blocks = adapter.get_blocks(model)
        self.home = next(model.parameters()).device
        self.placement = block_devices(len(self.blocks), devices) if devices else None
        self.results: dict[str, QuantizedTensor] = {}

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int) -> nn.Module:
        block = self.blocks[index]
        return block.to(self.placement[index]) if self.placement else block

    def finish(self, index: int, quantized: dict[str, QuantizedTensor],
               outputs: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        if self.placement and self.placement[index] != self.home:
            self.blocks[index].to(self.home)
        self.results.update(quantized)
        return outputs


def quantize_model(
    model: nn.Module,
    adapter: ModelAdapter,
    quantizer: Quantizer,
    scheme_for: SchemeFor,
    calib: torch.Tensor | None,
    options: EngineOptions | None = None,
    label: str = "",
) -> dict[str, QuantizedTensor]:
    """Quantize every linear of every decoder block in place (fake quant) and return the quantized tensors."""
    options = options or EngineOptions()
    check_layers(model, adapter, scheme_for)
    check_calibration(quantizer, options, calib)
    blocks = ResidentBlocks(model, adapter, options.devices)
    inputs = None
    if calib is not None and (quantizer.needs_calibration or options.statistics):
        calib = options.ranks.windows(calib)
        with torch.no_grad():
            inputs = capture_block_inputs(model, adapter, calib, calibration_batch(calib, options))
    quantize_blocks(blocks, adapter, quantizer, scheme_for, inputs, options, label)
    return blocks.results


def check_calibration(quantizer: Quantizer, options: EngineOptions, calib: torch.Tensor | None) -> None:
    """Refuse a run that needs calibration data and has none."""
    if calib is None and (quantizer.needs_calibration or options.statistics):
        raise QuantkitError(f"method {quantizer.name!r} needs calibration data" if quantizer.needs_calibration
                            else "measuring layer statistics needs calibration data")


def calibration_batch(calib: torch.Tensor, options: EngineOptions) -> int:
    """Calibration windows per forward batch."""
    return max(1, options.batch_tokens // calib.shape[1])


def quantize_blocks(
    blocks: BlockSource,
    adapter: ModelAdapter,
    quantizer: Quantizer,
    scheme_for: SchemeFor,
    inputs: Calibrated | None,
    options: EngineOptions,
    label: str = "",
    start: int = 0,
) -> None:
    """Quantize blocks ``start`` onwards in order; ``inputs`` holds the batches entering block ``start``, or is
    None when no statistics are needed."""
    quantize = _group_quantizer(quantizer, options)
    with torch.no_grad(), progress_bar() as progress:
        task = progress.add_task(f"{label} quantizing", total=len(blocks), completed=start)
        for i in range(start, len(blocks)):
            progress.update(task, description=f"{label} block {i + 1}/{len(blocks)}")
            block, prefix, quantized = blocks.load(i), f"{adapter.blocks}.{i}", {}
            if inputs is None:
                linears = {f"{prefix}.{name}": _linear(block, name, f"{prefix}.{name}")
                           for name in adapter.block_linear_names(block)}
                stats = {full: LayerStats(clip=options.weight_clip.get(full)) for full in linears}
                quantized.update(quantize_linears(linears, stats, quantize, scheme_for))
                outputs = None
            else:
                device = next(block.parameters()).device
                jobs = [(block, hidden.to(device), move_to(kwargs, device)) for hidden, kwargs in inputs.entering(i)]
                runs = _block_runs(block, prefix, adapter, quantize, scheme_for, quantized, options)
                outputs = (_lockstep_pass if options.true_sequential else _two_pass)(runs, jobs, options.forward_dtype)
            outputs = blocks.finish(i, quantized, outputs)
            if inputs is not None and outputs is not None:
                inputs.hidden = outputs
            progress.advance(task)


def _block_runs(block: nn.Module, prefix: str, adapter: ModelAdapter, quantize: GroupQuantizer,
                scheme_for: SchemeFor, results: dict[str, QuantizedTensor],
                options: EngineOptions) -> list[_GroupRun | _ExpertsRun]:
    """The statistics hooks of ``block``: its dense groups, and its routed experts if it has them."""
    runs: list[_GroupRun | _ExpertsRun] = [
        _GroupRun([(block, prefix)], adapter.block_groups(block), quantize, scheme_for, results, options)]
    if adapter.expert_count(block):
        spec = adapter.experts
        runs.append(_ExpertsRun(block.get_submodule(spec.path), f"{prefix}.{spec.path}", spec.linear_groups(),
                                quantize, scheme_for, results, options))
    return runs


def _forward(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """The block's output for one batch, in the dtype of its input (an autocast forward may return another)."""
    return block_output(block(hidden, **kwargs)).to(hidden.dtype)


# One job of a pass: the module it runs (a block, or one expert), its input and keyword arguments.
Job = tuple[nn.Module, torch.Tensor, dict]


def _lockstep_pass(runs: list[_GroupRun | _ExpertsRun], jobs: list[Job],
                   forward_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """One forward pass whose jobs meet at each group (and at the experts), quantized once all arrived."""
    lockstep = Lockstep()
    handles = [handle for run in runs for handle in run.install(lockstep.job_index, lockstep.rendezvous)]
    try:
        with _forward_precision(jobs[0][0], forward_dtype):  # the jobs share this thread's autocast state
            return lockstep.run([lambda job=job: _forward(*job) for job in jobs])
    finally:
        for handle in handles:
            handle.remove()


def _two_pass(runs: list[_GroupRun | _ExpertsRun], jobs: list[Job],
              forward_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Statistics from the full-precision modules, then quantize, then the quantized modules' outputs."""
    current = {"job": 0}
    handles = [handle for run in runs for handle in run.install(lambda: current["job"], lambda _action: None)]
    try:
        with _forward_precision(jobs[0][0], forward_dtype):
            for index, (module, hidden, kwargs) in enumerate(jobs):
                current["job"] = index
                module(hidden, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for run in runs:
        run.finish()
    with _forward_precision(jobs[0][0], forward_dtype):
        return [_forward(*job) for job in jobs]
