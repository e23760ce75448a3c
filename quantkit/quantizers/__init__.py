"""Quantizers behind one interface, looked up by method name."""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.quantizers.base import LayerStats, Quantizer
from quantkit.quantizers.gptq import GPTQQuantizer
from quantkit.quantizers.rtn import RTNQuantizer
from quantkit.quantizers.spqr import SpQRQuantizer

QUANTIZERS: dict[str, type[Quantizer]] = {cls.name: cls for cls in (RTNQuantizer, GPTQQuantizer, SpQRQuantizer)}


def make_quantizer(method: str, **options) -> Quantizer:
    """Build the quantizer registered as ``method``; options set to None take the method's default.

    An option the method does not have is an error, so that no setting is silently ignored.
    """
    try:
        cls = QUANTIZERS[method]
    except KeyError:
        raise QuantkitError(f"unknown method {method!r}; available: {', '.join(QUANTIZERS)}") from None
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(cls.__dataclass_fields__))
    if unknown:
        names = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise QuantkitError(f"method {method!r} has no option {names}; its options: "
                            f"{', '.join(cls.__dataclass_fields__) or 'none'}")
    return cls(**given)


__all__ = ["LayerStats", "Quantizer", "QUANTIZERS", "make_quantizer"]
