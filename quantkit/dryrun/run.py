"""`quantkit quantize --dry-run`: predicted peak memory (resident and ``--offload disk``), the output's exact
size and the work directory's, the time from a probe on block 0, and the runtimes that will load the output;
refused for the steps that work on the whole model at once (their cost is not what one block shows)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from quantkit.allocation.costs import LayerCost
from quantkit.allocation.plan import AllocationPlan
from quantkit.calib import load_calibration
from quantkit.calib.sources import MODEL_SAMPLED
from quantkit.dryrun.probe import Probe, probe_block
from quantkit.dryrun.sizes import (
    layer_specs,
    native_side_file_bytes,
    resident_shards,
    safetensors_bytes,
    shard_file_bytes,
    streamed_shards,
)
from quantkit.engine import EngineOptions, linear_shapes
from quantkit.errors import QuantkitError
from quantkit.export.writer import estimated_bytes
from quantkit.models.loading import float32_bytes, load_local_tokenizer, local_model_dir, stored_dtype
from quantkit.runplan import RunPlan, runtime_refusals, unquantized_dtype
from quantkit.streaming.run import spilled_bytes
from quantkit.streaming.source import StreamedModel


@dataclass(frozen=True)
class DryRun:
    """The predictions, in bytes and seconds (None: ``--offload disk`` cannot make this run); ``size_basis``: the
    output size is ``exact`` (native layout, no data-dependent tensors), ``at least`` (native, with outliers or a
    plan's record) or ``about`` (another layout: the layout's own count of each layer's bytes)."""

    model: str
    layout: str
    peak_rss_resident: int
    peak_rss_offload: int
    output_bytes_resident: int
    output_bytes_offload: int | None
    work_dir_bytes_offload: int | None
    size_basis: str
    seconds: float
    runtimes: list[str]
    refusals: list[str]
    probe: dict


def check_dry_run(run: RunPlan) -> None:
    """Refuse, before anything is read, a run whose cost a probe on one block cannot show."""
    refused = [(run.transform is not None, "a transform (it is trained on the whole model)"),
               (run.allocation is not None and not isinstance(run.allocation, AllocationPlan),
                "choosing a bit allocation (it measures the whole model; pass a saved plan)"),
               (run.act_static is not None, "static activation scales"), (run.kv_cache is not None, "KV-cache scales"),
               (run.head is not None, "--quantize-head")]
    for condition, what in refused:
        if condition:
            raise QuantkitError(f"--dry-run cannot predict {what}")


def dry_run(model: str, run: RunPlan) -> DryRun:
    """Predict what quantizing ``model`` (a local directory of safetensors shards, a GGUF file or a built-in
    alias) with ``run`` costs."""
    check_dry_run(run)
    source = StreamedModel(local_model_dir(model, "--dry-run"))
    tokenizer = load_local_tokenizer(source.folder)
    from quantkit.api import quantization_record  # the record a run writes

    dtype = unquantized_dtype(run.dtype, run.writer.auto_dtype or stored_dtype(source.config_dict))
    plan = run.allocation if isinstance(run.allocation, AllocationPlan) else None
    scheme_for = plan.scheme_for(run.scheme) if plan is not None else (lambda _name: run.scheme)
    shapes = linear_shapes(source.model, source.adapter)
    layers = list(shapes)
    record = quantization_record(run, model, mixed=plan is not None)
    exact = plan is None and not any(run.quantizer.plan(s).data_dependent for s in run.candidates)
    basis = "about" if run.layout != "native" else "exact" if exact else "at least"
    if run.layout == "native":
        tensors, records = layer_specs(shapes, run.quantizer, scheme_for)
        if plan is not None:
            record["allocation"] = plan.summary()
        side = native_side_file_bytes(source.model, tokenizer, records, record, dtype)
        resident = {**shard_file_bytes(resident_shards(source.model, tensors, layers, dtype)), **side}
        streamed, streamed_parts = None, []
        if plan is None:  # --offload disk takes no allocation
            streamed_parts = streamed_shards(source.model, source.adapter.blocks, source.num_blocks, tensors, layers,
                                             dtype)
            streamed = {**shard_file_bytes(streamed_parts), **side}
    else:
        cost = LayerCost(run.layout, dtype)
        layer_bytes = {name: cost(run.quantizer.plan(scheme_for(name)).meta(shape), shape) for name, shape in shapes.items()}
        resident, streamed, streamed_parts = {"tensors": estimated_bytes(source.model, layer_bytes, dtype)}, None, []
    calib = _windows(run, tokenizer, source) if run.quantizer.needs_calibration else None
    spilled = 0 if calib is None else spilled_bytes(calib, source.model.config.hidden_size)
    refusals = _refusals(run)
    torch.manual_seed(run.seed)
    probe = probe_block(source, run.quantizer, scheme_for, calib,
                        EngineOptions(true_sequential=run.true_sequential, forward_dtype=run.forward_torch_dtype))
    return DryRun(model, run.layout, _resident_peak(source, probe, sum(resident.values())), probe.peak_rss,
                  sum(resident.values()), None if streamed is None else sum(streamed.values()),
                  None if streamed is None else sum(safetensors_bytes(part) for part in streamed_parts) + spilled,
                  basis,
                  probe.setup_seconds + source.num_blocks * (probe.load_seconds + probe.block_seconds),
                  _loading_runtimes(run, refusals), refusals, asdict(probe))


def _windows(run: RunPlan, tokenizer, source: StreamedModel) -> torch.Tensor:
    """The run's calibration windows; for a source sampled from the whole model, random ids of their shape
    (the probe's cost depends on the shape alone; the sampling is not timed)."""
    spec = run.calibration
    if spec.source in MODEL_SAMPLED:
        generator = torch.Generator().manual_seed(run.seed)
        return torch.randint(0, source.model.config.vocab_size, (spec.nsamples, spec.seqlen), generator=generator)
    return load_calibration(spec.source, tokenizer, spec.nsamples, spec.seqlen, run.seed, data_dir=spec.data_dir)


def _resident_peak(source: StreamedModel, probe: Probe, output_bytes: int) -> int:
    """A resident run holds the whole float model, the hidden states and every finished block's quantized
    layers while the last block is quantized (block 0's working set above its weights, as the probe saw), then
    the encoded tensors and one shard's serialized copy while it writes."""
    blocks = source.adapter.get_blocks(source.model)
    weights = float32_bytes(source.model)
    outer = weights - sum(float32_bytes(block) for block in blocks)
    hidden = max(0, probe.setup_rss - probe.base_rss - outer)
    held = probe.base_rss + weights + hidden + (len(blocks) - 1) * probe.quantized_bytes
    quantizing = held + probe.peak_rss - probe.loaded_rss
    writing = held + probe.quantized_bytes + 2 * output_bytes
    return max(quantizing, writing)


def _loading_runtimes(run: RunPlan, refusals: list[str]) -> list[str]:
    """The runtimes known to load the layout that none of the run's ``refusals`` names."""
    return [name for name in run.writer.runtimes if not any(line.startswith(name) for line in refusals)]


def _refusals(run: RunPlan) -> list[str]:
    schemes = list(run.candidates)
    return runtime_refusals(run.writer, schemes, [run.quantizer.plan(scheme).column_groups for scheme in schemes])

