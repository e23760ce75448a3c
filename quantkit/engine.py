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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.hessian import HessianAccumulator
from quantkit.lockstep import Lockstep
from quantkit.models.adapters import ModelAdapter
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
    true_sequential: bool = True
    batch_tokens: int = 8192  # calibration tokens per forward batch
    weight_clip: dict[str, torch.Tensor] = field(default_factory=dict)  # learned clipping ratios per output row
    statistics: bool = False  # gather Hessians even for a quantizer that needs no calibration
    quantize_layer: LayerQuantizer | None = None  # replaces ``quantizer.quantize`` (it may record more choices)


def _linear(block: nn.Module, name: str, full_name: str) -> nn.Linear:
    module = block.get_submodule(name)
    if not isinstance(module, nn.Linear):
        raise QuantkitError(f"{full_name} is a {type(module).__name__}, not a linear layer")
    return module


def check_layers(model: nn.Module, adapter: ModelAdapter, scheme_for: SchemeFor) -> None:
    """Refuse up front what would fail half way: missing linears, schemes that do not fit, bad weights."""
    for i, block in enumerate(adapter.get_blocks(model)):
        for name in adapter.linear_names():
            full = f"{adapter.blocks}.{i}.{name}"
            linear = _linear(block, name, full)
            scheme_for(full).check_fits(full, linear.in_features)
            if not torch.isfinite(linear.weight).all():
                raise QuantkitError(f"weight of {full} contains NaN or infinite values")


def _layer_quantizer(quantizer: Quantizer, options: EngineOptions) -> LayerQuantizer:
    if options.quantize_layer is not None:
        return options.quantize_layer
    return lambda _name, weight, stats, scheme: quantizer.quantize(weight, stats, scheme)


def _quantize_linear(linear: nn.Linear, full: str, quantize: LayerQuantizer, stats: LayerStats,
                     scheme: QuantScheme) -> QuantizedTensor:
    qt = quantize(full, linear.weight.data, stats, scheme)
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
                    acc = self.accumulators[g] = HessianAccumulator(x.shape[-1])
                acc.add(x)
                on_group(g)
            elif first != identity:
                raise QuantkitError(f"{full} does not read the same input as the rest of its group; the adapter is wrong")

        return hook


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
    blocks = adapter.get_blocks(model)
    results: dict[str, QuantizedTensor] = {}
    quantize = _layer_quantizer(quantizer, options)
    with torch.no_grad(), progress_bar() as progress:
        if not (quantizer.needs_calibration or options.statistics):
            task = progress.add_task(f"{label} quantizing", total=len(blocks))
            for i, block in enumerate(blocks):
                for name in adapter.linear_names():
                    full = f"{adapter.blocks}.{i}.{name}"
                    stats = LayerStats(clip=options.weight_clip.get(full))
                    results[full] = _quantize_linear(_linear(block, name, full), full, quantize, stats, scheme_for(full))
                progress.advance(task)
            return results
        if calib is None:
            raise QuantkitError(f"method {quantizer.name!r} needs calibration data" if quantizer.needs_calibration
                                else "measuring layer statistics needs calibration data")
        batch_size = max(1, options.batch_tokens // calib.shape[1])
        inputs = capture_block_inputs(model, adapter, calib, batch_size)
        task = progress.add_task(f"{label} block 1/{len(blocks)}", total=len(blocks))
        for i, block in enumerate(blocks):
            progress.update(task, description=f"{label} block {i + 1}/{len(blocks)}")
            run = _BlockRun(block, f"{adapter.blocks}.{i}", adapter, quantize, scheme_for, results, options.weight_clip)
            if options.true_sequential:
                outputs = _lockstep_pass(block, run, inputs)
            else:
                outputs = _two_pass(block, run, inputs)
            inputs = [(out, kwargs) for out, (_, kwargs) in zip(outputs, inputs)]
            progress.advance(task)
    return results


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
