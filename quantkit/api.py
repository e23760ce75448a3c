"""The public surface: quantize a model, load a quantized checkpoint."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quantkit import __version__
from quantkit.engine import EngineOptions, quantize_model
from quantkit.export.atomic import check_output_dir
from quantkit.export.native import save_native
from quantkit.formats.base import QuantizedTensor
from quantkit.models.loading import load_model
from quantkit.quantizers import make_quantizer
from quantkit.runtime.loader import load, load_tokenizer
from quantkit.schemes import QuantScheme


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


def quantize(
    model: str,
    method: str = "gptq",
    scheme: QuantScheme | None = None,
    calibration: CalibrationSpec | None = None,
    output: str | Path | None = None,
    seed: int = 0,
    true_sequential: bool = True,
    overwrite: bool = False,
    **quantizer_options,
) -> QuantizeResult:
    """Quantize ``model`` (hub id, directory, GGUF file or built-in alias); write a checkpoint to ``output``."""
    from quantkit.calib import load_calibration

    scheme = scheme or QuantScheme()
    calibration = calibration or CalibrationSpec()
    quantizer = make_quantizer(method, **quantizer_options)
    if output is not None:
        check_output_dir(Path(output), overwrite)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    loaded = load_model(model)
    seconds["load"] = time.perf_counter() - start
    calib = None
    if quantizer.needs_calibration:
        start = time.perf_counter()
        calib = load_calibration(
            calibration.source, loaded.tokenizer, calibration.nsamples, calibration.seqlen, seed,
            model=loaded.model, data_dir=calibration.data_dir,
        )
        seconds["calibration"] = time.perf_counter() - start
    torch.manual_seed(seed)
    start = time.perf_counter()
    quantized = quantize_model(
        loaded.model, loaded.adapter, quantizer, lambda _name: scheme, calib,
        EngineOptions(true_sequential=true_sequential), label=f"{method} w{scheme.bits}",
    )
    seconds["quantize"] = time.perf_counter() - start
    config = {
        "method": method,
        "quantizer": quantizer.options(),
        "scheme": scheme.to_dict(),
        "calibration": (
            {"source": calibration.source, "nsamples": calibration.nsamples, "seqlen": calibration.seqlen,
             "true_sequential": true_sequential}
            if quantizer.needs_calibration else None
        ),
        "seed": seed,
        "source_model": model,
        "quantkit_version": __version__,
    }
    if output is not None:
        start = time.perf_counter()
        save_native(Path(output), loaded.model, loaded.tokenizer, quantized, config, overwrite=overwrite)
        seconds["export"] = time.perf_counter() - start
    return QuantizeResult(loaded.model, loaded.tokenizer, quantized, config, seconds)


__all__ = ["CalibrationSpec", "QuantizeResult", "load", "load_tokenizer", "quantize"]
