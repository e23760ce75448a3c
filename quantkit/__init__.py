"""quantkit: post-training quantization for large language models."""

from __future__ import annotations

from quantkit.integrations.transformers import register_when_imported

__version__ = "0.1.0"

register_when_imported()  # AutoModelForCausalLM.from_pretrained loads native checkpoints as load() does


def load(path, kernel=None):
    """Load a quantized checkpoint as a transformers model (see :func:`quantkit.runtime.loader.load`)."""
    from quantkit.runtime.loader import load as _load

    return _load(path, kernel)


def load_tokenizer(path):
    """The tokenizer stored with a checkpoint."""
    from quantkit.runtime.loader import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


def quantize(model, **kwargs):
    """Quantize a model; see :func:`quantkit.api.quantize` for the options."""
    from quantkit.api import quantize as _quantize

    return _quantize(model, **kwargs)


__all__ = ["__version__", "load", "load_tokenizer", "quantize"]
