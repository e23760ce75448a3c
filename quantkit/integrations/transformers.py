"""Loading quantkit's native checkpoints with transformers' ``from_pretrained``.

``import quantkit`` registers quantkit's quantization config and quantizer
(:mod:`quantkit.integrations.hf_quantizer`) under the native layout's ``quant_method`` in transformers'
quantizer registry, when transformers imports that registry (it takes seconds to import, so quantkit does
not import it itself). GPTQ and compressed-tensors checkpoints keep going to transformers' own quantizers.
"""

from __future__ import annotations

import importlib
import sys

from quantkit.errors import QuantkitError
from quantkit.integrations.post_import import when_imported

REGISTRY = "transformers.quantizers.auto"


def register() -> None:
    """Register quantkit with transformers' quantizer registry now (once); a one-line error where this
    transformers has none."""
    registry = importlib.import_module(REGISTRY)
    if not hasattr(registry, "register_quantizer"):
        version = getattr(sys.modules.get("transformers"), "__version__", "?")
        raise QuantkitError(f"transformers {version} has no quantizer registry (register_quantizer); upgrade "
                            "transformers to load quantkit checkpoints with from_pretrained, or use quantkit.load")
    from quantkit.integrations.hf_quantizer import register_with

    register_with(registry)


def _register_if_supported() -> None:
    """Register, where the registry has the API (an older transformers goes on without it)."""
    if hasattr(sys.modules[REGISTRY], "register_quantizer"):
        register()


def register_when_imported() -> None:
    """Register as soon as transformers' quantizer registry is imported (now, if it already is)."""
    when_imported(REGISTRY, _register_if_supported)
