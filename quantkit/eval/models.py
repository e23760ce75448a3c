"""Loading whatever ``quantkit eval`` is pointed at: a quantkit checkpoint or a full-precision model."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.models.loading import load_model
from quantkit.runtime.loader import is_quantkit_checkpoint, load, load_tokenizer


@dataclass
class EvalTarget:
    name: str
    model: nn.Module
    tokenizer: object
    quantized: bool
    stored_dtype: torch.dtype | None = None  # a float model's dtype on disk (it is evaluated in float32)


def load_target(spec: str, kernel: str | None = None) -> EvalTarget:
    """A directory that declares quantization loads only through the runtime (served by ``kernel``), which refuses
    a quantization config it cannot read; anything else as a float model."""
    if is_quantkit_checkpoint(spec):
        return EvalTarget(spec, load(spec, kernel), load_tokenizer(spec), quantized=True)
    loaded = load_model(spec)
    return EvalTarget(spec, loaded.model, loaded.tokenizer, quantized=False, stored_dtype=loaded.stored_dtype)
