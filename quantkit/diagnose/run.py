"""`quantkit diagnose`: load the float base and a quantized checkpoint of it, attribute the divergence, and
optionally find a repair and write its allocation plan."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn

from quantkit import defaults
from quantkit.allocation.costs import LayerCost
from quantkit.allocation.units import make_units
from quantkit.diagnose.attribution import attribute
from quantkit.diagnose.repair import RepairTarget, find_repair, repair_plan
from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter
from quantkit.quantizers.base import LayerStats

REPORT_FORMAT = "quantkit-diagnose"
REPORT_VERSION = 1


@dataclass
class DiagnoseRequest:
    base: str  # the float model: hub id, folder, .gguf or built-in alias
    quantized: str  # a quantkit checkpoint of it
    heldout: str = "wikitext2"  # text the divergence is measured on
    windows: int = defaults.DIAGNOSE_HELDOUT[0]
    seqlen: int = defaults.DIAGNOSE_HELDOUT[1]
    calibration: str = defaults.CALIBRATION  # text whose inputs the relative output errors are measured on
    nsamples: int = defaults.DIAGNOSE_CALIBRATION[0]
    calib_seqlen: int = defaults.DIAGNOSE_CALIBRATION[1]
    granularity: str = "linear"
    data_dir: str | None = None
    seed: int = defaults.SEED
    target: RepairTarget | None = None  # repair to this KL or top-1 agreement
    repair_bits: int = defaults.REPAIR_BITS
    plan: Path | None = None  # where the repair's allocation plan goes


@dataclass
class QuantizedCheckpoint:
    """What diagnose reads of a checkpoint: each quantized linear's dequantized weight and, from a native
    checkpoint's record, the method and scheme that made it (for a repair plan)."""

    weights: dict[str, torch.Tensor]
    record: dict
    layout: str


def read_quantized(path: str, model: nn.Module, adapter: ModelAdapter) -> QuantizedCheckpoint:
    """The dequantized weights of a checkpoint of ``model``'s architecture, checked against its shapes. Refused:
    another architecture, a transform (its weights live in another basis), quantized activations, a quantized
    head (diagnose swaps decoder linears only)."""
    from quantkit.runtime.loader import is_quantkit_checkpoint, open_checked

    if not is_quantkit_checkpoint(path):
        raise QuantkitError(f"{path} is not a quantkit checkpoint (no quantization_config in its config.json)")
    checked = open_checked(path)
    model_type = checked.config.model.get("model_type")
    if model_type != model.config.model_type:
        raise QuantkitError(f"{path} is a {model_type} checkpoint; the base model is {model.config.model_type}")
    record = checked.config.quantization
    for present, what in ((record.get("transform"), "a transform (its weights are in another basis)"),
                          (checked.inputs, "quantized activations"), (record.get("head"), "a quantized head")):
        if present:
            raise QuantkitError(f"{path} holds {what}; diagnose compares decoder linears of weight-only checkpoints")
    expected = set(adapter.quantizable_layers(model))
    weights = {}
    for layer, decoded, _buffers in checked.layers():
        if layer not in expected:
            raise QuantkitError(f"{path} quantizes {layer}, which is not a decoder linear of the base model")
        weight = decoded.quantized.dequantize(torch.float32)
        if weight.shape != model.get_submodule(layer).weight.shape:
            raise QuantkitError(f"{layer} is {tuple(weight.shape)} in {path} but "
                                f"{tuple(model.get_submodule(layer).weight.shape)} in the base model")
        weights[layer] = weight
    if not weights:
        raise QuantkitError(f"{path} holds no quantized linear")
    return QuantizedCheckpoint(weights, record, checked.config.layout.name)


def heldout_windows(text: str, tokenizer, windows: int, seqlen: int, source: str) -> torch.Tensor:
    """The first ``windows`` consecutive windows of ``seqlen`` tokens of ``text``, as ``[windows, seqlen]``."""
    from quantkit.eval.perplexity import tokenize_stream

    stream = tokenize_stream(text, tokenizer)
    if stream.numel() < windows * seqlen:
        raise QuantkitError(f"{source} holds {stream.numel()} tokens, fewer than {windows} windows of {seqlen}")
    return stream[: windows * seqlen].reshape(windows, seqlen)


def run_diagnose(request: DiagnoseRequest) -> dict:
    """The diagnosis report (and, with a KL target, the repair plan written to ``request.plan``)."""
    from quantkit.calib.sources import load_calibration
    from quantkit.models.loading import check_context, check_model_exists, load_model
    from quantkit.quantizers import make_quantizer
    from quantkit.schemes import QuantScheme
    from quantkit.textsources import load_eval_text, resolve_data_dir

    check_model_exists(request.base)
    check_model_exists(request.quantized)
    folder = resolve_data_dir(request.data_dir)
    data_dir = str(folder) if folder is not None else None
    text, source = load_eval_text(request.heldout, data_dir)
    loaded = load_model(request.base)
    model, adapter = loaded.model, loaded.adapter
    check_context(model, request.seqlen, "--seqlen")
    check_context(model, request.calib_seqlen, "--calib-seqlen")
    checkpoint = read_quantized(request.quantized, model, adapter)
    base_scheme = None
    if request.target is not None:  # refuse before the measurements what the plan cannot be made for
        scheme = checkpoint.record.get("scheme") if checkpoint.layout == "native" else None
        if not scheme or scheme.get("bits") is None:
            raise QuantkitError("--repair needs a native checkpoint of one uniform scheme (its record names the "
                                "method and widths a plan starts from)")
        base_scheme = QuantScheme.from_dict(scheme)
        if request.repair_bits <= base_scheme.bits:
            raise QuantkitError(f"--repair-bits {request.repair_bits} is not above the checkpoint's "
                                f"{base_scheme.bits} bits")
    heldout = heldout_windows(text, loaded.tokenizer, request.windows, request.seqlen, source)
    calib = load_calibration(request.calibration, loaded.tokenizer, request.nsamples, request.calib_seqlen,
                             request.seed, model=model, data_dir=data_dir)
    blocks = adapter.get_blocks(model)
    quantized = checkpoint.weights
    units = [u for u in make_units(adapter, blocks, request.granularity) if all(n in quantized for n in u.layers)]
    block_units = [replace(u, layers=tuple(n for n in u.layers if n in quantized))
                   for u in make_units(adapter, blocks, "block") if any(n in quantized for n in u.layers)]
    attribution = attribute(model, adapter, quantized, units, block_units, heldout, list(calib.split(4)))
    report = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "base": request.base, "quantized": request.quantized, "model_type": model.config.model_type,
        "linear_names": adapter.linear_names(),
        "settings": {"heldout": request.heldout, "heldout_source": source, "windows": request.windows,
                     "seqlen": request.seqlen, "calibration": request.calibration, "nsamples": request.nsamples,
                     "calib_seqlen": request.calib_seqlen, "granularity": request.granularity, "seed": request.seed,
                     "data_dir": data_dir},
        "total": {"kl": attribution.total.kl, "top1": attribution.total.top1},
        "units": [unit.to_dict() for unit in attribution.units],
        "blocks": [block.to_dict() for block in attribution.blocks],
        "repair": None,
    }
    if base_scheme is not None:
        quantizer = make_quantizer(str(checkpoint.record["method"]), **checkpoint.record.get("quantizer", {}))
        raised_scheme = replace(base_scheme, bits=request.repair_bits)
        rtn = make_quantizer("rtn")  # the raised width's error is small: round-to-nearest stands in for the method
        raised = {name: rtn.quantize(model.get_submodule(name).weight.data, LayerStats(), raised_scheme)
                  .dequantize(torch.float32) for name in quantized}
        repair = find_repair(model, adapter, quantized, raised, attribution, heldout, request.target,
                             request.repair_bits)
        plan, added = repair_plan(repair, units, model, quantizer, base_scheme, request.granularity,
                                  LayerCost(checkpoint.layout, loaded.stored_dtype))
        report["repair"] = {**repair.to_dict(), "plan": None if request.plan is None else str(request.plan),
                            "bits_per_weight": plan.bits_per_weight, "added_bytes": added}
        if request.plan is not None:
            request.plan.parent.mkdir(parents=True, exist_ok=True)
            plan.save(request.plan)
    return report
