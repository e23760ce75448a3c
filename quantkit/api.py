"""The public surface: quantize a model, load a quantized checkpoint."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantkit import __version__, defaults
from quantkit.actcalib import calibrate_static_inputs
from quantkit.actquant import StaticActivations, attach_input_quantizers
from quantkit.allocation.allocate import plan_allocation
from quantkit.allocation.costs import LayerCost, bits_per_weight, budget_bytes
from quantkit.allocation.measure import feasible
from quantkit.allocation.options import AllocationOptions, nearest_width
from quantkit.allocation.plan import AllocationPlan, check_plan
from quantkit.devices import resolve_devices
from quantkit.diskspace import check_space, size_text
from quantkit.distributed import Ranks, join, launched_ranks
from quantkit.engine import EngineOptions, linear_shapes, quantize_model
from quantkit.engine.sequential import calibration_batch
from quantkit.errors import QuantkitError
from quantkit.export.atomic import check_output_dir, check_output_file
from quantkit.export.save import model_dtype, save_checkpoint
from quantkit.export.writer import estimated_bytes
from quantkit.formats.base import QuantizedTensor
from quantkit.head import quantize_head
from quantkit.kvcache import KVCacheQuantization
from quantkit.kvcache import calibrate as calibrate_kv_cache
from quantkit.layouts import Layout, get_layout
from quantkit.layouts.native import FORMAT_VERSION as NATIVE_FORMAT_VERSION
from quantkit.models.architectures import adapter_for
from quantkit.models.builtin import source_gguf
from quantkit.models.loading import (
    LoadedModel,
    check_context,
    check_float_model,
    load_model,
    stored_bytes,
    stored_dtype,
)
from quantkit.progress import phase
from quantkit.runplan import (
    CalibrationSpec,
    RunPlan,
    plan_run,
    unquantized_dtype,
    warn_moe_runtimes,
    warn_runtimes,
)
from quantkit.runtime.loader import load, load_tokenizer
from quantkit.schemes import GGUF_FALLBACK, QuantScheme
from quantkit.streaming.state import remove_dead_state
from quantkit.transforms.base import AppliedTransform, Transform, TransformContext
from quantkit.transforms.rewrite import attach_online


@dataclass
class QuantizeResult:
    model: nn.Module
    tokenizer: object
    quantized: dict[str, QuantizedTensor]
    quantization_config: dict
    seconds: dict[str, float] = field(default_factory=dict)
    input_quantizers: list[RemovableHandle] = field(default_factory=list)  # remove() them for weight-only outputs
    online_transforms: list[RemovableHandle] = field(default_factory=list)  # the transform's run-time maps
    source_bytes: int = 0  # the source model's parameters in the dtype it stores them in
    source_dtype: torch.dtype = torch.float32
    writer: bool = True  # False on the ranks of a data-parallel run that leave the writing to rank 0

    @property
    def source_size(self) -> str:
        """The source model's size, e.g. ``source: 513.1 MiB in float32``."""
        return f"source: {size_text(self.source_bytes)} in {str(self.source_dtype).removeprefix('torch.')}"


def quantize(
    model: str | LoadedModel,
    method: str = defaults.METHOD,
    scheme: QuantScheme | None = None,
    calibration: CalibrationSpec | None = None,
    output: str | Path | None = None,
    seed: int = defaults.SEED,
    true_sequential: bool = defaults.TRUE_SEQUENTIAL,
    overwrite: bool = False,
    layout: str = defaults.LAYOUT,
    dtype: str = defaults.DTYPE,
    act_scheme: QuantScheme | None = None,
    transform: Transform | AppliedTransform | None = None,
    allocation: AllocationOptions | AllocationPlan | None = None,
    offload: str | None = None,
    devices: Sequence[str] | None = None,
    trust_remote_code: bool = False,
    act_static: StaticActivations | None = None,
    kv_cache: KVCacheQuantization | None = None,
    quantize_head: str | None = None,
    forward_dtype: str = defaults.FORWARD_DTYPE,
    **quantizer_options,
) -> QuantizeResult:
    """Quantize ``model`` (hub id, directory, GGUF file or built-in alias, or one already loaded); write a
    checkpoint to ``output``.

    ``scheme`` defaults to the method's usual one (:meth:`Quantizer.default_scheme`). ``act_scheme`` quantizes
    the inputs of every quantized linear (fake quantization, see :mod:`quantkit.actquant`), in the returned
    model and in the checkpoint: per token, or with ``act_static`` by static scales calibrated on the
    calibration windows once the weights are quantized (:mod:`quantkit.actcalib`). ``kv_cache`` rounds keys and
    values with static scales calibrated last, on the model as served (:mod:`quantkit.kvcache`).
    ``quantize_head`` (``int8`` or ``int4``) quantizes the output head too (:mod:`quantkit.head`). ``transform`` (see :mod:`quantkit.transforms`) rewrites the model
    first (or, given as an :class:`AppliedTransform`, was already fused into the loaded ``model``); its online
    input maps run in the returned model and are stored in the checkpoint. ``layout`` is
    ``native``, ``gptq`` (v1) or ``compressed-tensors``; a scheme the layout cannot express is refused before
    the model is loaded. ``dtype`` (``auto``, ``float32``, ``float16``, ``bfloat16``) is the dtype the checkpoint
    keeps its unquantized tensors in; ``auto`` is the source model's. ``allocation`` gives every linear its own width of ``scheme``: chosen here under a
    target of average bits (:class:`AllocationOptions`) or taken from a saved :class:`AllocationPlan`.

    ``forward_dtype`` (``float32`` or ``bfloat16``) is the arithmetic of calibration's forward passes through the
    blocks (autocast; Hessians and solves stay float32/float64): bfloat16 is faster where the hardware has it.

    ``offload="disk"`` streams the model (a local directory of safetensors shards) one decoder block at a
    time, writes each finished block at once and spills activations to disk, so peak memory stays near one
    block whatever the depth; a killed run keeps its state beside ``output`` and the same call resumes it
    (see :mod:`quantkit.streaming`). ``devices`` (e.g. ``["cuda:0", "cuda:1"]``) spreads the blocks over
    devices in contiguous runs; each block runs on its own. ``trust_remote_code`` lets transformers run a
    model's own Python code when it loads the whole model (off unless asked for; streaming builds the
    architecture from quantkit's adapters and never runs model code).
    """
    run = plan_run(method, scheme, calibration=calibration, seed=seed, true_sequential=true_sequential, layout=layout,
                   dtype=dtype, act_scheme=act_scheme, transform=transform, allocation=allocation, act_static=act_static,
                   kv_cache=kv_cache, quantize_head=quantize_head, forward_dtype=forward_dtype, **quantizer_options)
    return quantize_run(model, run, output, overwrite, offload, devices, trust_remote_code)


def quantize_run(model: str | LoadedModel, run: RunPlan, output: str | Path | None = None, overwrite: bool = False,
                 offload: str | None = None, devices: Sequence[str] | None = None,
                 trust_remote_code: bool = False) -> QuantizeResult:
    """Carry out ``run`` (see :func:`quantkit.runplan.plan_run`) on ``model``; the rest as :func:`quantize`."""
    quantizer, scheme, schemes, calibration, seed = run.quantizer, run.scheme, list(run.candidates), run.calibration, run.seed
    transform, allocation, act_scheme = run.transform, run.allocation, run.act_scheme
    if output is not None:  # before the model, whose check may convert a GGUF file
        _check_output(run.writer, Path(output), overwrite)
    checked = None if isinstance(model, LoadedModel) else check_float_model(  # the model, before any data is read
        model, in_memory=offload is None, trust_remote_code=trust_remote_code)
    if (model.adapter if isinstance(model, LoadedModel) else adapter_for(checked[1].model_type)).experts is not None:
        warn_moe_runtimes(run.writer, schemes)
    if _reads_calibration(run):
        calibration.check()
    if isinstance(transform, AppliedTransform) and not isinstance(model, LoadedModel):
        raise QuantkitError("an applied transform needs the loaded model it was fused into")
    engine_devices = resolve_devices(devices) if devices else ()
    ranks = _join_ranks(run, engine_devices)
    if ranks.device.type == "cuda":
        engine_devices = (ranks.device,)  # each rank runs every block on its own GPU
    if offload is not None:
        return _quantize_offloaded(model, run, offload, output, engine_devices, overwrite, ranks)
    seconds: dict[str, float] = {}
    with phase(f"loading {_model_name(model)}", seconds, "load"):
        loaded = model if isinstance(model, LoadedModel) else load_model(model, trust_remote_code=trust_remote_code,
                                                                          checked=checked)
    source_bytes = loaded.stored_bytes  # before a transform or the head untie the embeddings
    shapes = linear_shapes(loaded.model, loaded.adapter)
    _check_layers(run.writer, schemes, shapes)
    _check_windows(loaded.model, run)
    cost = LayerCost(run.layout, model_dtype(loaded.model))
    kept_dtype = unquantized_dtype(run.dtype, run.writer.auto_dtype or loaded.stored_dtype)
    if output is not None:  # a checkpoint that cannot fit, before any work
        check_space(Path(output).absolute().parent,
                    _checkpoint_bytes(loaded.model, shapes, quantizer, schemes, cost, kept_dtype), "the checkpoint")
    if isinstance(allocation, AllocationOptions):  # an impossible target, before calibration and training
        feasible(loaded.model, loaded.adapter, quantizer, scheme, allocation, cost)
    elif allocation is not None:
        check_plan(allocation, loaded.model, loaded.adapter, quantizer, scheme, cost, {})
    calib = None
    if _calibrates(run):
        with phase(f"calibration ({calibration.source}, {calibration.nsamples} × {calibration.seqlen} tokens)",
                   seconds, "calibration"):
            calib = _calibration(loaded, calibration, seed)
    applied, online_hooks, hooks = transform if isinstance(transform, AppliedTransform) else None, [], []
    if isinstance(transform, Transform):
        with phase(f"transform {transform.name}", seconds, "transform"):
            applied = apply_transform(loaded, transform, _working_scheme(scheme, allocation), act_scheme,
                                      calibration, seed)
    if applied is not None:
        online_hooks = attach_online(loaded.model, applied.online)
    weight_clip = applied.weight_clip if applied else {}
    extra_bytes = _online_bytes(applied)
    plan = allocation if isinstance(allocation, AllocationPlan) else None
    if isinstance(allocation, AllocationOptions):
        with phase(f"allocation ({allocation.strategy})", seconds, "allocation"):
            torch.manual_seed(seed)
            plan = plan_allocation(loaded.model, loaded.adapter, quantizer, scheme, allocation, calib, cost,
                                   weight_clip, extra_bytes, run.true_sequential)
    if plan is not None:
        check_plan(plan, loaded.model, loaded.adapter, quantizer, scheme, cost, extra_bytes)
        trained = _working_scheme(scheme, plan).bits  # learned clips belong to the width they were learned for
        weight_clip = {layer: clip for layer, clip in weight_clip.items() if plan.layer_bits[layer] == trained}
    torch.manual_seed(seed)
    options = EngineOptions(true_sequential=run.true_sequential, weight_clip=weight_clip, devices=engine_devices,
                            expert_min_tokens=calibration.expert_min_tokens, ranks=ranks,
                            forward_dtype=run.forward_torch_dtype)
    with phase("quantizing", seconds, "quantize"):
        quantized = quantize_model(
            loaded.model, loaded.adapter, quantizer, plan.scheme_for(scheme) if plan else lambda _name: scheme,
            calib, options,
            label=f"{run.method} {_scheme_label(scheme) if plan is None else f'mixed {plan.target_bits} bits'}",
        )
    if not ranks.writer:
        return QuantizeResult(loaded.model, loaded.tokenizer, quantized, {}, seconds, writer=False)
    if run.head is not None:
        with phase(f"quantizing the output head ({_scheme_label(run.head)} RTN)", seconds, "head"):
            quantized[loaded.adapter.lm_head] = quantize_head(loaded.model, loaded.adapter, run.head)
    allocation_record = _allocation_record(plan, quantized, cost, extra_bytes) if plan else None
    if run.act_static is not None:
        with phase(f"static activation scales ({run.act_static.observer}, per {run.act_static.granularity})",
                   seconds, "activation scales"):
            _, hooks = calibrate_static_inputs(loaded.model, loaded.adapter, list(quantized), calib,
                                               calibration_batch(calib, options), act_scheme, run.act_static, seed)
    elif act_scheme is not None:
        hooks = attach_input_quantizers(loaded.model, quantized, act_scheme, applied.act_clip if applied else None)
    if run.kv_cache is not None:
        with phase(f"KV-cache scales ({run.kv_cache.format}, per {run.kv_cache.granularity})", seconds, "kv cache"):
            calibrate_kv_cache(loaded.model, loaded.adapter, run.kv_cache, calib, calibration_batch(calib, options))
    config = quantization_record(run, loaded.source, mixed=plan is not None)
    config["transform"] = (
        {**applied.record, "online": {layer: list(k.sizes) for layer, k in applied.online.items()},
         "activation_clip": applied.act_clip}
        if applied else None
    )
    config["allocation"] = allocation_record
    config["experts"] = options.experts_record()
    if output is not None:
        with phase(f"writing {output}", seconds, "export"):
            save_checkpoint(run.layout, Path(output), loaded.model, loaded.tokenizer, quantized, config,
                            overwrite=overwrite, dtype=kept_dtype, source_file=source_gguf(loaded.source))
        if not run.writer.single_file:
            remove_dead_state(Path(output))  # what a killed --offload disk run writing the same output left
    return QuantizeResult(loaded.model, loaded.tokenizer, quantized, config, seconds, hooks, online_hooks,
                          source_bytes, loaded.stored_dtype)


def allocate(
    model: str | LoadedModel,
    options: AllocationOptions,
    method: str = defaults.METHOD,
    scheme: QuantScheme | None = None,
    calibration: CalibrationSpec | None = None,
    seed: int = defaults.SEED,
    layout: str = defaults.LAYOUT,
    **quantizer_options,
) -> AllocationPlan:
    """Plan the widths of ``scheme`` for every linear of ``model`` under ``options``, counting the bytes
    ``layout`` writes, without writing a checkpoint (save the plan and pass it to :func:`quantize` as
    ``allocation``)."""
    run = plan_run(method, scheme, calibration=calibration, seed=seed, layout=layout, allocation=options,
                   **quantizer_options)
    return allocate_run(model, run)


def allocate_run(model: str | LoadedModel, run: RunPlan) -> AllocationPlan:
    """Carry out the allocation of ``run`` (its ``allocation`` is the options) on ``model``; see :func:`allocate`."""
    quantizer, scheme, options, calibration, seed = run.quantizer, run.scheme, run.allocation, run.calibration, run.seed
    needs_calibration = options.needs_calibration or quantizer.plan(scheme).data_dependent
    checked = None if isinstance(model, LoadedModel) else check_float_model(model)
    if needs_calibration:
        calibration.check()
    loaded = model if isinstance(model, LoadedModel) else load_model(model, checked=checked)
    _check_layers(run.writer, list(run.candidates), linear_shapes(loaded.model, loaded.adapter))
    if needs_calibration:
        check_context(loaded.model, calibration.seqlen, "--seqlen")
    calib = _calibration(loaded, calibration, seed) if needs_calibration else None
    torch.manual_seed(seed)
    return plan_allocation(loaded.model, loaded.adapter, quantizer, scheme, options, calib,
                           LayerCost(run.layout, model_dtype(loaded.model)))


def quantization_record(run: RunPlan, source: str, mixed: bool = False) -> dict:
    """What config.json records of a run: method, options, scheme (no width when ``mixed``: each layer has its
    own), activations, calibration, seed, source."""
    scheme, calibration = run.scheme, run.calibration
    return {
        "method": run.method,
        "quantizer": run.quantizer.options(scheme),
        "scheme": {**scheme.to_dict(), "bits": None} if mixed else scheme.to_dict(),
        "input_activations": run.inputs.record() if run.inputs is not None else None,
        "kv_cache": run.kv_cache.record() if run.kv_cache is not None else None,
        "head": run.head.to_dict() if run.head is not None else None,
        "calibration": (
            {"source": calibration.source, "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
             "true_sequential": run.true_sequential, "forward_dtype": run.forward_dtype}
            if run.quantizer.needs_calibration else None
        ),
        "transform": None,
        "allocation": None,
        "experts": None,
        "seed": run.seed,
        "source_model": source,
        "quantkit_version": __version__,
    }


def _quantize_offloaded(model: str | LoadedModel, run: RunPlan, offload: str, output: str | Path | None,
                        devices: tuple[torch.device, ...], overwrite: bool, ranks: Ranks) -> QuantizeResult:
    """:func:`quantize` streaming block by block from disk (see :mod:`quantkit.streaming`)."""
    from quantkit.models.loading import load_local_tokenizer, local_model_dir
    from quantkit.streaming import StreamedModel, StreamedRun, quantize_streamed

    if offload != "disk":
        raise QuantkitError(f"unknown --offload {offload!r}; the one choice is disk")
    refused = [(isinstance(model, LoadedModel), "an already loaded model"), (output is None, "no output directory"),
               (run.layout != "native", f"the {run.layout} layout (write native, then `quantkit export`)"),
               (run.transform is not None, "a transform (it rewrites the whole model at once)"),
               (run.head is not None, "--quantize-head (quantize the head of the streamed checkpoint with a full run)"),
               (run.allocation is not None, "a bit allocation (it measures the whole model at once)"),
               (run.act_static is not None, "static activation scales (they are calibrated on the whole model)"),
               (run.kv_cache is not None, "KV-cache quantization (it is calibrated on the whole model)")]
    for condition, what in refused:
        if condition:
            raise QuantkitError(f"--offload disk cannot work with {what}")
    seconds: dict[str, float] = {}
    with phase(f"reading the headers of {model}", seconds, "load"):
        source = StreamedModel(local_model_dir(str(model)))
        tokenizer = load_local_tokenizer(source.folder)
    calibration = run.calibration
    if run.quantizer.needs_calibration:
        check_context(source.model, calibration.seqlen, "--seqlen")
    source_dtype = stored_dtype(source.config_dict)
    kept_dtype = unquantized_dtype(run.dtype, source_dtype)
    record = quantization_record(run, str(model))
    arguments = {key: record[key] for key in ("method", "scheme", "input_activations", "seed", "source_model",
                                              "quantkit_version")}
    arguments["quantizer"] = asdict(run.quantizer)  # as given: the record resolves some settings from the scheme
    arguments |= {"calibration": [calibration.source, calibration.nsamples, calibration.seqlen, calibration.data_dir,
                                  run.true_sequential, run.forward_dtype], "weights": source.identity(),
                  "devices": [str(device) for device in devices],  # arithmetic differs between device kinds
                  "ranks": ranks.world,  # each rank spills its own share of the windows
                  "format_version": NATIVE_FORMAT_VERSION,  # finished blocks are stored in this version's layout
                  "dtype": str(kept_dtype)}
    streamed = StreamedRun(run.quantizer, run.scheme, calibration, run.seed,
                           EngineOptions(true_sequential=run.true_sequential, devices=devices,
                                         expert_min_tokens=calibration.expert_min_tokens, ranks=ranks,
                                         forward_dtype=run.forward_torch_dtype),
                           f"{run.method} {_scheme_label(run.scheme)}", kept_dtype)
    with phase("quantizing and writing, block by block", seconds, "quantize and export"):
        quantize_streamed(source, tokenizer, streamed, arguments, Path(output), record, overwrite)
    return QuantizeResult(source.model, tokenizer, {}, record, seconds,
                          source_bytes=stored_bytes(source.model, source_dtype), source_dtype=source_dtype,
                          writer=ranks.writer)


def _join_ranks(run: RunPlan, devices: tuple[torch.device, ...]) -> Ranks:
    """The data-parallel ranks of a run launched by torchrun (one rank otherwise); what the ranks cannot share
    is refused first: the steps before the engine that train or measure on the whole model."""
    if launched_ranks() > 1:
        refused = [(isinstance(run.transform, Transform), "a transform"),
                   (isinstance(run.allocation, AllocationOptions), "choosing a bit allocation (save a plan with "
                                                                    "`quantkit allocate` and pass it)")]
        for condition, what in refused:
            if condition:
                raise QuantkitError(f"data-parallel runs (torchrun) cannot do {what}; run it in one process")
    return join(devices)


def _reads_calibration(run: RunPlan) -> bool:
    """Whether the run reads calibration windows: the quantizer, a transform, the allocation or static scales."""
    return _calibrates(run) or _training_budget(run.transform) is not None


def _calibrates(run: RunPlan) -> bool:
    """Whether quantizing, allocating bits or calibrating static activation scales reads calibration windows
    (of ``--nsamples × --seqlen``)."""
    allocation = run.allocation
    return (run.quantizer.needs_calibration or run.act_static is not None or run.kv_cache is not None
            or (isinstance(allocation, AllocationOptions) and allocation.needs_calibration))


def _training_budget(transform: Transform | AppliedTransform | None):
    """The training budget of a transform still to be trained, else None."""
    return getattr(transform, "budget", None) if isinstance(transform, Transform) else None


def _check_windows(model: nn.Module, run: RunPlan) -> None:
    """Calibration and training windows must fit in the model's context."""
    if _calibrates(run):
        check_context(model, run.calibration.seqlen, "--seqlen")
    budget = _training_budget(run.transform)
    if budget is not None:
        check_context(model, budget.seqlen, "--transform-seqlen")


def _working_scheme(scheme: QuantScheme, allocation: AllocationOptions | AllocationPlan | None) -> QuantScheme:
    """``scheme`` at the width a transform is trained for: the allocation's nearest to its target."""
    if isinstance(allocation, AllocationOptions):
        return replace(scheme, bits=allocation.working_bits)
    if isinstance(allocation, AllocationPlan):
        return replace(scheme, bits=nearest_width(allocation.bit_choices, allocation.target_bits))
    return scheme


def _allocation_record(plan: AllocationPlan, quantized: dict[str, QuantizedTensor], cost: LayerCost,
                       extra_bytes: dict[str, int]) -> dict:
    """The plan's record with the bits per weight the quantized layers write; refuses them over the target
    (data-dependent formats such as SpQR can exceed what was planned)."""
    nbytes = sum(cost.of(qt) + extra_bytes.get(name, 0) for name, qt in quantized.items())
    weights = sum(qt.shape[0] * qt.shape[1] for qt in quantized.values())
    if nbytes > budget_bytes(plan.target_bits, weights):
        raise QuantkitError(
            f"the quantized layers write {bits_per_weight(nbytes, weights):.4f} bits per weight, over the target of "
            f"{plan.target_bits}: their outliers outgrew the plan; lower the target or raise --outlier-threshold"
        )
    return {**plan.summary(), "bits_per_weight": bits_per_weight(nbytes, weights)}


def _check_layers(writer: Layout, schemes: list[QuantScheme], shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse layer shapes ``writer`` cannot hold with any of ``schemes``."""
    for scheme in schemes:
        for layer, (_, in_features) in shapes.items():
            writer.check_layer(layer, scheme, in_features)


def _checkpoint_bytes(model: nn.Module, shapes: dict[str, tuple[int, int]], quantizer, schemes: list[QuantScheme],
                      cost: LayerCost, dtype: torch.dtype) -> int:
    """The least a checkpoint of ``model`` (its linears of ``shapes``) quantized at one of ``schemes`` takes (see
    :func:`estimated_bytes`)."""
    layer_bytes = {name: min(cost(quantizer.plan(scheme).meta(shape), shape) for scheme in schemes)
                   for name, shape in shapes.items()}
    return estimated_bytes(model, layer_bytes, dtype)


def _calibration(loaded: LoadedModel, calibration: CalibrationSpec, seed: int) -> torch.Tensor:
    from quantkit.calib import load_calibration

    return load_calibration(calibration.source, loaded.tokenizer, calibration.nsamples, calibration.seqlen, seed,
                            model=loaded.model, data_dir=calibration.data_dir)


def _online_bytes(applied: AppliedTransform | None) -> dict[str, int]:
    """Bytes each layer's online input factors take in the checkpoint."""
    if applied is None:
        return {}
    return {layer: sum(t.numel() * t.element_size() for t in (kron.left, kron.right))
            for layer, kron in applied.online.items()}


def apply_transform(loaded: LoadedModel, transform: Transform, scheme: QuantScheme, act_scheme: QuantScheme | None,
                    calibration: CalibrationSpec, seed: int = 0) -> AppliedTransform:
    """Rewrite ``loaded``'s model in place with ``transform``, prepared for ``scheme`` weights and ``act_scheme``
    activations, training (if it does) on windows of ``calibration``'s source."""
    from quantkit.calib import load_calibration

    def windows(count: int, length: int) -> torch.Tensor:
        return load_calibration(calibration.source, loaded.tokenizer, count, length, seed, model=loaded.model,
                                data_dir=calibration.data_dir)

    return transform.apply(TransformContext(loaded.model, loaded.adapter, scheme, act_scheme, windows, seed))


def _model_name(model: str | LoadedModel) -> str:
    return model.source if isinstance(model, LoadedModel) else model


def _scheme_label(scheme: QuantScheme) -> str:
    return f"w{scheme.bits}" if scheme.format == "int" else scheme.format


def export(source: str | Path, output: str | Path, layout: str, overwrite: bool = False,
           gguf_type: str | None = None) -> nn.Module:
    """Convert a checkpoint quantkit can load into ``layout`` at ``output``; returns the loaded model. To the
    GGUF layout, ``source`` may also be an unquantized model, written in the float ``gguf_type`` (f16 unless
    said); a quantized checkpoint must hold GGUF formats already (its ``gguf_type``, if given)."""
    from quantkit.runtime.loader import is_quantkit_checkpoint, open_checked, open_checkpoint
    from quantkit.runtime.quant_linear import QuantLinear

    writer = get_layout(layout)
    if gguf_type is not None and not writer.single_file:
        raise QuantkitError(f"--gguf-type goes with --layout gguf, not --layout {layout}")
    if writer.single_file and not is_quantkit_checkpoint(source):
        return _export_float_gguf(str(source), Path(output), gguf_type or "f16", overwrite)
    checkpoint = open_checkpoint(Path(source))
    qc = checkpoint.quantization
    inputs = checkpoint.layout.input_quantization(qc)
    writer.check(activations=inputs, online=bool((qc.get("transform") or {}).get("online")))
    metas = [plan.meta for plan in open_checked(Path(source)).plans.values()]
    if writer.single_file:
        _check_gguf_sources(str(source), metas, gguf_type)
    _check_output(writer, Path(output), overwrite)
    stored_schemes = [QuantScheme.from_dict(meta) for meta in metas]
    warn_runtimes(writer, stored_schemes, [bool(meta.get("act_order")) for meta in metas])
    if adapter_for(str(checkpoint.model.get("model_type"))).experts is not None:
        warn_moe_runtimes(writer, stored_schemes)
    model = load(source)
    quantized = {name: m.quantized() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    has_tokenizer = any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(source) if has_tokenizer else None
    if checkpoint.layout.name == "native":
        config = {k: v for k, v in qc.items() if k not in ("quant_method", "format", "format_version", "layers")}
    else:
        kv = checkpoint.layout.kv_cache(qc)
        config = {"method": checkpoint.layout.name, "source_quantization_config": qc,
                  "input_activations": None if inputs is None else inputs.record(),
                  "kv_cache": None if kv is None else kv.record()}
    save_checkpoint(layout, Path(output), model, tokenizer, quantized, config, overwrite=overwrite,
                    source_file=source_gguf(config.get("source")))
    if not writer.single_file:
        remove_dead_state(Path(output))
    return model


def _check_gguf_sources(source: str, metas: list[dict], gguf_type: str | None) -> None:
    """Refuse, before any data is read, layers a GGUF file cannot hold exactly, or in another type than asked."""
    from quantkit.formats.gguf import exact_gguf_format
    from quantkit.layouts.gguf import check_gguf_type

    for meta in metas:
        scheme = QuantScheme.from_dict(meta)
        get_layout("gguf").check_scheme(scheme, bool(meta.get("act_order")))
        stored = scheme.format if scheme.is_gguf else exact_gguf_format(scheme)
        if gguf_type is not None and stored not in (check_gguf_type(gguf_type), GGUF_FALLBACK.get(gguf_type)):
            raise QuantkitError(f"{source} holds {stored} layers; writing them as {gguf_type} would quantize them "
                                f"again: quantize the float model with --layout gguf --gguf-type {gguf_type}")


def _check_output(writer: Layout, output: Path, overwrite: bool) -> None:
    """Refuse an output ``writer`` cannot write (a file or a directory, as it writes), before any work."""
    (check_output_file if writer.single_file else check_output_dir)(output, overwrite)


def _export_float_gguf(source: str, output: Path, gguf_type: str, overwrite: bool) -> nn.Module:
    """Write the unquantized model ``source`` as a GGUF file of float ``gguf_type`` tensors."""
    from quantkit.layouts.gguf import FLOAT_TYPES, check_gguf_type

    if check_gguf_type(gguf_type) not in FLOAT_TYPES:
        raise QuantkitError(f"{source} is not quantized: GGUF export writes it as {', '.join(FLOAT_TYPES)}; for "
                            f"{gguf_type}, quantize it with --layout gguf --gguf-type {gguf_type}")
    check_output_file(output, overwrite)
    loaded = load_model(source, checked=check_float_model(source))
    save_checkpoint("gguf", output, loaded.model, loaded.tokenizer, {}, {"source": source}, overwrite=overwrite,
                    dtype=FLOAT_TYPES[gguf_type], source_file=source_gguf(source))
    return loaded.model


__all__ = ["AllocationOptions", "AllocationPlan", "CalibrationSpec", "QuantizeResult", "RunPlan", "allocate",
           "allocate_run", "apply_transform", "export", "load", "load_tokenizer", "plan_run", "quantize", "quantize_run"]
