"""Block-by-block sequential quantization (GPTQ's driver), for any quantizer behind the one interface.

Calibration windows go through the embeddings once; then each decoder block, in order, sees the outputs of
the already-quantized blocks before it. Within a block, the Hessian of every group of linears that share an
input is accumulated over all windows, the group is quantized, and its weights are replaced in place by
their dequantized values (fake quantization), so what follows sees the quantization error.

True-sequential (the default) takes each group's statistics after the earlier groups of the same block were
quantized. It runs as a single forward pass per block: the batches advance in lockstep and meet at each
group, where the group is quantized once all batches contributed. Without it, statistics come from the
full-precision block (one pass), then the quantized block recomputes the outputs (a second pass).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from quantkit import defaults
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


def _linear(block: nn.Module, name: str, full_name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise QuantkitError(f"{full_name} is a {type(module).__name__}, not a linear layer")
    return module


def linear_shapes(model: nn.Module, adapter: ModelAdapter) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every linear the engine quantizes, by full name."""
    return {f"{adapter.blocks}.{i}.{name}": (linear.out_features, linear.in_features)
            for i, block in enumerate(adapter.get_blocks(model)) for name in adapter.linear_names()
            for linear in [block.get_submodule(name)]}


def check_layers(model: nn.Module, adapter: ModelAdapter, scheme_for: SchemeFor, values: bool = True) -> None:
    """Refuse up front what would fail half way: missing linears, schemes that do not fit, and (``values``)
    non-finite weights."""
    for i, block in enumerate(adapter.get_blocks(model)):
        for name in adapter.linear_names():
            full = f"{adapter.blocks}.{i}.{name}"
            in_features = _linear(block, name, full).in_features
            scheme_for(full).for_columns(in_features).check_fits(full, in_features)
        if values:
            check_finite(block, f"{adapter.blocks}.{i}")


def _layer_quantizer(quantizer: Quantizer, options: EngineOptions) -> LayerQuantizer:
    if options.quantize_layer is not None:
        return options.quantize_layer
    return lambda _name, weight, stats, scheme: quantizer.quantize(weight, stats, scheme)


def _quantize_linear(linear: nn.Linear, full: str, quantize: LayerQuantizer, stats: LayerStats,
                     scheme: QuantScheme) -> QuantizedTensor:
    """Quantize one linear on the CPU (the quantizers' column sweeps are written for it), whatever device the
    block runs on, and put the dequantized weight back in place."""
    weight = linear.weight.data
    if weight.device.type != "cpu":
        weight = weight.cpu()
        stats = replace(stats, hessian=None if stats.hessian is None else stats.hessian.cpu())
    qt = quantize(full, weight, stats, scheme.for_columns(weight.shape[1]))
    linear.weight.data.copy_(qt.dequantize(linear.weight.dtype))
    return qt


def capture_block_inputs(
    model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states and keyword arguments (masks, position embeddings) entering block 0, per batch."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = adapter.get_blocks(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in calib.split(batch_size):
            try:
                model(input_ids=batch.to(model.device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def block_output(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out  # type: ignore[index]


class _BlockRun:
    """Statistics hooks for one block: one Hessian per group of linears sharing an input."""

    def __init__(
        self,
        block: nn.Module,
        prefix: str,
        adapter: ModelAdapter,
        quantize: LayerQuantizer,
        scheme_for: SchemeFor,
        results: dict[str, QuantizedTensor],
        weight_clip: dict[str, torch.Tensor],
    ) -> None:
        self.block, self.prefix, self.groups, self.weight_clip = block, prefix, adapter.groups, weight_clip
        self.quantize, self.scheme_for, self.results = quantize, scheme_for, results
        self.accumulators: dict[int, HessianAccumulator] = {}
        self.seen: dict[tuple[int, int], tuple[int, torch.Size]] = {}  # (job, group) -> the input's identity

    def quantize_group(self, g: int) -> None:
        acc = self.accumulators.pop(g)
        hessian = acc.hessian()
        for name in self.groups[g]:
            full = f"{self.prefix}.{name}"
            linear = _linear(self.block, name, full)
            stats = LayerStats(hessian=hessian, tokens=acc.tokens, clip=self.weight_clip.get(full))
            self.results[full] = _quantize_linear(linear, full, self.quantize, stats, self.scheme_for(full))

    def install(self, job_index: Callable[[], int], on_group: Callable[[int], None]) -> list:
        """Hooks that accumulate each group's Hessian once per job, then call ``on_group(g)``."""
        handles = []
        for g, group in enumerate(self.groups):
            for name in group:
                full = f"{self.prefix}.{name}"
                handles.append(_linear(self.block, name, full).register_forward_pre_hook(self._hook(g, full, job_index, on_group)))
        return handles

    def _hook(self, g: int, full: str, job_index: Callable[[], int], on_group: Callable[[int], None]):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            key = (job_index(), g)
            identity = (x.data_ptr(), x.shape)
            first = self.seen.get(key)
            if first is None:
                self.seen[key] = identity
                acc = self.accumulators.get(g)
                if acc is None:
                    acc = self.accumulators[g] = HessianAccumulator(x.shape[-1], x.device)
                acc.add(x)
                on_group(g)
            elif first != identity:
                raise QuantkitError(f"{full} does not read the same input as the rest of its group; the adapter is wrong")

        return hook


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
    inputs: list[tuple[torch.Tensor, dict]] | None,
    options: EngineOptions,
    label: str = "",
    start: int = 0,
) -> None:
    """Quantize blocks ``start`` onwards in order; ``inputs`` (per batch: hidden states and keyword arguments)
    enter block ``start``, or None when no statistics are needed."""
    quantize = _layer_quantizer(quantizer, options)
    with torch.no_grad(), progress_bar() as progress:
        task = progress.add_task(f"{label} quantizing", total=len(blocks), completed=start)
        for i in range(start, len(blocks)):
            progress.update(task, description=f"{label} block {i + 1}/{len(blocks)}")
            block, prefix, quantized = blocks.load(i), f"{adapter.blocks}.{i}", {}
            if inputs is None:
                for name in adapter.linear_names():
                    full = f"{prefix}.{name}"
                    stats = LayerStats(clip=options.weight_clip.get(full))
                    quantized[full] = _quantize_linear(_linear(block, name, full), full, quantize, stats,
                                                       scheme_for(full))
                outputs = None
            else:
                device = next(block.parameters()).device
                inputs = [(hidden.to(device), move_to(kwargs, device)) for hidden, kwargs in inputs]
                run = _BlockRun(block, prefix, adapter, quantize, scheme_for, quantized, options.weight_clip)
                outputs = (_lockstep_pass if options.true_sequential else _two_pass)(block, run, inputs)
            outputs = blocks.finish(i, quantized, outputs)
            if inputs is not None and outputs is not None:
                inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
            progress.advance(task)


def _lockstep_pass(block: nn.Module, run: _BlockRun, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    lockstep = Lockstep()
    handles = run.install(lockstep.job_index, lambda g: lockstep.rendezvous(lambda: run.quantize_group(g)))
    try:
        return lockstep.run([lambda h=h, kw=kw: block_output(block(h, **kw)) for h, kw in inputs])
    finally:
        for handle in handles:
            handle.remove()


def _two_pass(block: nn.Module, run: _BlockRun, inputs: list[tuple[torch.Tensor, dict]]) -> list[torch.Tensor]:
    current = {"job": 0}
    last_group = len(run.groups) - 1

    def on_group(g: int) -> None:
        if g == last_group:
            raise _StopForward

    handles = run.install(lambda: current["job"], on_group)
    try:
        for job, (h, kw) in enumerate(inputs):
            current["job"] = job
            try:
                block(h, **kw)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    run.seen.clear()
    for g in range(len(run.groups)):
        run.quantize_group(g)
    return [block_output(block(h, **kw)) for h, kw in inputs]
