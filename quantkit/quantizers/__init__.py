"""Quantizers behind one interface, looked up by method name."""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.quantizers.gptq import GPTQQuantizer
from quantkit.quantizers.rtn import RTNQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {cls.name: cls for cls in (RTNQuantizer, GPTQQuantizer)}


def make_quantizer(method: str, **options) -> Quantizer:
    """Build the quantizer registered as ``method`` with the options it accepts (others are ignored)."""
    try:
        cls = QUANTIZERS[method]
    except KeyError:
        raise QuantkitError(f"unknown method {method!r}; available: {', '.join(QUANTIZERS)}") from None
    fields = cls.__dataclass_fields__
    return cls(**{k: v for k, v in options.items() if k in fields})


__all__ = ["LayerStats", "Quantizer", "QUANTIZERS", "make_quantizer"]
