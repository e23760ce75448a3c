"""Static activation scales calibrated on the calibration windows, block by block.

Once the weights are quantized, the windows go through the blocks in order, one forward pass per block with
the batches in lockstep (:func:`~quantkit.engine.passes.lockstep_outputs`). At each input of the block's
quantized linears (linears reading the same tensor share one scale: vLLM fuses q/k/v and gate/up into one
matmul with one input scale) the batches stop until all have been observed; the observer
(:class:`~quantkit.actquant.StaticActivations`) fixes the scale, the input's quantizer is switched on, and the
batches go on with quantized inputs, so every scale sees the activations the served model gives it, and the
block's quantized outputs feed the next block. Routed experts, which not every batch reaches, are observed over
the whole pass instead; a block with experts then runs once more with their quantizers on.

Observers, on ``|x|`` per tensor or per input channel: ``minmax`` over every calibration token; ``percentile``
and ``mse`` over a random sample of :data:`SAMPLE_TOKENS` tokens per input (``mse``: the maximum times
0.3…1 with the least squared error of :func:`~quantkit.actquant.quantize_static`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantkit.actquant import (
    StaticActivations,
    attach_input_quantizers,
    fake_quantize_static,
    quantize_static,
    static_limit,
)
from quantkit.engine.passes import (
    BlockInputs,
    InputStatistics,
    block_outputs,
    input_statistics,
    lockstep_outputs,
    walk_blocks,
)
from quantkit.errors import QuantkitError
from quantkit.formats.grid import MIN_SCALE
from quantkit.models.adapters import ModelAdapter
from quantkit.progress import progress_bar
from quantkit.schemes import QuantScheme

SAMPLE_TOKENS = 4096
_MSE_FACTORS = torch.linspace(0.3, 1.0, 36).tolist()


def _percentile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile of ``values [tokens, channels]`` per channel (``k``-th smallest, no interpolation)."""
    k = max(1, min(values.shape[0], round(q / 100 * values.shape[0])))
    return values.kthvalue(k, dim=0).values


def observed_bound(stats: InputStatistics, scheme: QuantScheme, static: StaticActivations) -> torch.Tensor:
    """The largest ``|x|`` the static grid should reach, per tensor (``[1]``) or per channel (``[in]``)."""
    per_channel = static.granularity == "channel"
    if static.observer == "minmax":
        return stats.abs_max if per_channel else stats.abs_max.amax().reshape(1)
    sample = stats.sample().abs()
    if not per_channel:
        sample = sample.reshape(-1, 1)
    if static.observer == "percentile":
        return _percentile(sample, static.percentile)
    return mse_bound(sample, scheme)


def mse_bound(sample: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Per column of ``sample [tokens, columns]`` (``|x|``), the clipped maximum (0.3…1 times it) whose static
    grid rounds the column with the least squared error."""
    maximum = sample.amax(dim=0)
    limit = static_limit(scheme)
    best, best_err = maximum, torch.full_like(maximum, float("inf"))
    for factor in _MSE_FACTORS:
        bound = maximum * factor
        err = (quantize_static(sample, scheme, (bound / limit).clamp_min(MIN_SCALE)) - sample).pow(2).sum(dim=0)
        better = err < best_err
        best, best_err = torch.where(better, bound, best), torch.where(better, err, best_err)
    return best


def static_scale(layer: str, stats: InputStatistics | None, scheme: QuantScheme,
                 static: StaticActivations) -> torch.Tensor:
    """The layer's ``input_scale`` from its observed inputs; a one-line error when there are none or they are
    not finite."""
    if stats is None or stats.tokens == 0:
        raise QuantkitError(f"no calibration token reached the input of {layer}, so its static activation scale "
                            "cannot be calibrated (a rarely routed expert?): use more calibration data or dynamic "
                            "activations")
    bound = observed_bound(stats, scheme, static)
    if not torch.isfinite(bound).all():
        raise QuantkitError(f"the calibration inputs of {layer} hold NaN or infinite values: no static scale")
    return (bound / static_limit(scheme)).clamp_min(MIN_SCALE).float()


def calibrate_static_inputs(model: nn.Module, adapter: ModelAdapter, layers: list[str], calib: torch.Tensor,
                            batch_size: int, scheme: QuantScheme, static: StaticActivations,
                            seed: int = 0) -> tuple[dict[str, torch.Tensor], list[RemovableHandle]]:
    """Calibrate the static input scale of every named (quantized) linear of ``model`` and switch its
    activation quantizer on (see the module docstring); the scales by layer and the hook handles."""
    static.check_scheme(scheme)
    wanted = set(layers)
    generator = torch.Generator().manual_seed(seed)
    scales: dict[str, torch.Tensor] = {}
    handles: list[RemovableHandle] = []
    blocks = adapter.get_blocks(model)
    with progress_bar() as progress:
        task = progress.add_task("static activation scales", total=len(blocks))

        def calibrate_block(index: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
            prefix = f"{adapter.blocks}.{index}"
            shared = [group for group in adapter.input_groups(block) if f"{prefix}.{group[0]}" in wanted]
            routed = {name for expert in adapter.expert_groups(block) for name in expert}
            dense = [group for group in shared if group[0] not in routed]
            rows = -(-SAMPLE_TOKENS // len(inputs))

            def settle(group: tuple[str, ...], stats: dict[str, InputStatistics], rest: tuple[str, ...]) -> None:
                """Fix the group's scale and switch its quantizers on (``rest``: the linears it is attached to now)."""
                scale = static_scale(f"{prefix}.{group[0]}", stats.get(group[0]), scheme, static)
                scales.update({f"{prefix}.{name}": scale for name in group})
                handles.extend(attach_input_quantizers(model, [f"{prefix}.{n}" for n in rest], scheme, scales=scales))

            def install(rendezvous) -> list:
                """At each dense group's first linear: wait for every batch, settle, go on quantized."""
                def hook_for(group: tuple[str, ...]):
                    def hook(_module: nn.Module, args: tuple) -> tuple:
                        rendezvous(lambda: settle(group, stats, group[1:]))
                        return (fake_quantize_static(args[0], scheme, scales[f"{prefix}.{group[0]}"]), *args[1:])

                    return hook

                return [block.get_submodule(group[0]).register_forward_pre_hook(hook_for(group)) for group in dense]

            with input_statistics(block, [group[0] for group in shared], rows, generator) as stats:
                outputs = lockstep_outputs(block, inputs, install)
            for group in dense:
                handles.extend(attach_input_quantizers(model, [f"{prefix}.{group[0]}"], scheme, scales=scales))
            late = [group for group in shared if group[0] in routed]
            for group in late:
                settle(group, stats, group)
            progress.advance(task)
            return block_outputs(block, inputs) if late else outputs

        walk_blocks(model, adapter, calib, batch_size, calibrate_block)
    return scales, handles
