"""The public surface: quantize a model, load a quantized checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from quantkit import __version__
from quantkit.actquant import attach_input_quantizers
from quantkit.engine import EngineOptions, quantize_model
from quantkit.errors import QuantkitError
from quantkit.export.atomic import check_output_dir
from quantkit.export.formats import check_layers, check_layout, save_checkpoint
from quantkit.formats.base import QuantizedTensor
from quantkit.models.loading import LoadedModel, load_model
from quantkit.quantizers import make_quantizer
from quantkit.runtime.loader import load, load_tokenizer
from quantkit.schemes import QuantScheme
from quantkit.transforms.base import AppliedTransform, Transform, TransformContext
from quantkit.transforms.rewrite import attach_online


@dataclass
class CalibrationSpec:
    source: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    data_dir: str | None = None


@dataclass
class QuantizeResult:
    model: nn.Module
    tokenizer: object
    quantized: dict[str, QuantizedTensor]
    quantization_config: dict
    seconds: dict[str, float] = field(default_factory=dict)
    input_quantizers: list[RemovableHandle] = field(default_factory=list)  # remove() them for weight-only outputs
    online_transforms: list[RemovableHandle] = field(default_factory=list)  # the transform's run-time maps


def quantize(
    model: str | LoadedModel,
    method: str = "gptq",
    scheme: QuantScheme | None = None,
    calibration: CalibrationSpec | None = None,
    output: str | Path | None = None,
    seed: int = 0,
    true_sequential: bool = True,
    overwrite: bool = False,
    layout: str = "native",
    act_scheme: QuantScheme | None = None,
    transform: Transform | AppliedTransform | None = None,
    **quantizer_options,
) -> QuantizeResult:
    """Quantize ``model`` (hub id, directory, GGUF file or built-in alias, or one already loaded); write a
    checkpoint to ``output``.

    ``scheme`` defaults to the method's usual one (:meth:`Quantizer.default_scheme`). ``act_scheme`` quantizes
    the inputs of every quantized linear per token (fake quantization, see :mod:`quantkit.actquant`), in the
    returned model and in the checkpoint. ``transform`` (see :mod:`quantkit.transforms`) rewrites the model
    first (or, given as an :class:`AppliedTransform`, was already fused into the loaded ``model``); its online
    input maps run in the returned model and are stored in the checkpoint. ``layout`` is
    ``native``, ``gptq`` (v1) or ``compressed-tensors``; a scheme the layout cannot express is refused before
    the model is loaded.
    """
    from quantkit.calib import load_calibration

    calibration = calibration or CalibrationSpec()
    quantizer = make_quantizer(method, **quantizer_options)
    scheme = scheme or quantizer.default_scheme()
    quantizer.check_scheme(scheme)
    check_layout(layout, scheme, quantizer.column_groups(scheme), quantizer.tensor_kind(scheme), act_scheme is not None,
                 transform is not None and transform.has_online())
    if isinstance(transform, AppliedTransform) and not isinstance(model, LoadedModel):
        raise QuantkitError("an applied transform needs the loaded model it was fused into")
    if output is not None:
        check_output_dir(Path(output), overwrite)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    seconds["load"] = time.perf_counter() - start
    check_layers(layout, scheme, _block_linear_shapes(loaded.model, loaded.adapter))
    calib = None
    if quantizer.needs_calibration:
        start = time.perf_counter()
        calib = load_calibration(
            calibration.source, loaded.tokenizer, calibration.nsamples, calibration.seqlen, seed,
            model=loaded.model, data_dir=calibration.data_dir,
        )
        seconds["calibration"] = time.perf_counter() - start
    applied, online_hooks, hooks = transform if isinstance(transform, AppliedTransform) else None, [], []
    if isinstance(transform, Transform):
        start = time.perf_counter()
        applied = apply_transform(loaded, transform, scheme, act_scheme, calibration, seed)
        seconds["transform"] = time.perf_counter() - start
    if applied is not None:
        online_hooks = attach_online(loaded.model, applied.online)
    torch.manual_seed(seed)
    start = time.perf_counter()
    quantized = quantize_model(
        loaded.model, loaded.adapter, quantizer, lambda _name: scheme, calib,
        EngineOptions(true_sequential=true_sequential, weight_clip=applied.weight_clip if applied else {}),
        label=f"{method} {_scheme_label(scheme)}",
    )
    seconds["quantize"] = time.perf_counter() - start
    if act_scheme is not None:
        hooks = attach_input_quantizers(loaded.model, quantized, act_scheme, applied.act_clip if applied else None)
    config = {
        "method": method,
        "quantizer": quantizer.options(),
        "scheme": scheme.to_dict(),
        "input_activations": act_scheme.to_dict() if act_scheme is not None else None,
        "calibration": (
            {"source": calibration.source, "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
             "true_sequential": true_sequential}
            if quantizer.needs_calibration else None
        ),
        "transform": (
            {**applied.record, "online": {layer: list(k.sizes) for layer, k in applied.online.items()},
             "activation_clip": applied.act_clip}
            if applied else None
        ),
        "seed": seed,
        "source_model": loaded.source,
        "quantkit_version": __version__,
    }
    if output is not None:
        start = time.perf_counter()
        save_checkpoint(layout, Path(output), loaded.model, loaded.tokenizer, quantized, config, overwrite=overwrite)
        seconds["export"] = time.perf_counter() - start
    return QuantizeResult(loaded.model, loaded.tokenizer, quantized, config, seconds, hooks, online_hooks)


def apply_transform(loaded: LoadedModel, transform: Transform, scheme: QuantScheme, act_scheme: QuantScheme | None,
                    calibration: CalibrationSpec, seed: int = 0) -> AppliedTransform:
    """Rewrite ``loaded``'s model in place with ``transform``, prepared for ``scheme`` weights and ``act_scheme``
    activations, training (if it does) on windows of ``calibration``'s source."""
    from quantkit.calib import load_calibration

    def windows(count: int, length: int) -> torch.Tensor:
        return load_calibration(calibration.source, loaded.tokenizer, count, length, seed, model=loaded.model,
                                data_dir=calibration.data_dir)

    return transform.apply(TransformContext(loaded.model, loaded.adapter, scheme, act_scheme, windows, seed))


def _scheme_label(scheme: QuantScheme) -> str:
    return f"w{scheme.bits}" if scheme.format == "int" else scheme.format


def _block_linear_shapes(model: nn.Module, adapter) -> dict[str, tuple[int, int]]:
    """``(out, in)`` of every linear the engine will quantize."""
    shapes = {}
    for i, block in enumerate(adapter.get_blocks(model)):
        for name in adapter.linear_names():
            linear = block.get_submodule(name)
            shapes[f"{adapter.blocks}.{i}.{name}"] = (linear.out_features, linear.in_features)
    return shapes


def export(source: str | Path, output: str | Path, layout: str, overwrite: bool = False) -> nn.Module:
    """Convert a checkpoint quantkit can load into ``layout`` at ``output``; returns the loaded model."""
    from quantkit.runtime.loader import open_checkpoint
    from quantkit.runtime.quant_linear import QuantLinear

    checkpoint = open_checkpoint(Path(source))
    qc = checkpoint.quantization
    check_layout(layout, activations=qc.get("input_activations") is not None,
                 online=bool((qc.get("transform") or {}).get("online")))
    check_output_dir(Path(output), overwrite)
    model = load(source)
    quantized = {name: m.quantized() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    has_tokenizer = any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = load_tokenizer(source) if has_tokenizer else None
    if checkpoint.format == "native":
        config = {k: v for k, v in qc.items() if k not in ("quant_method", "format", "format_version", "layers")}
    else:
        config = {"method": checkpoint.format, "source_quantization_config": qc}
    save_checkpoint(layout, Path(output), model, tokenizer, quantized, config, overwrite=overwrite)
    return model


__all__ = ["CalibrationSpec", "QuantizeResult", "apply_transform", "export", "load", "load_tokenizer", "quantize"]
