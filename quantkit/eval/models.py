"""Loading whatever ``quantkit eval`` is pointed at: a quantkit checkpoint or a full-precision model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.models.loading import load_model
from quantkit.runtime.loader import is_quantkit_checkpoint, load, load_tokenizer


@dataclass
class EvalTarget:
    name: str
    model: nn.Module
    tokenizer: object
    quantized: bool


def load_target(spec: str, kernel: str | None = None) -> EvalTarget:
    """A quantized checkpoint directory loads through the runtime (served by ``kernel``); anything else as a float model."""
    if is_quantkit_checkpoint(spec):
        return EvalTarget(spec, load(spec, kernel), load_tokenizer(spec), quantized=True)
    loaded = load_model(spec)
    return EvalTarget(spec, loaded.model, loaded.tokenizer, quantized=False)
