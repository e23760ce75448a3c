"""Quantizers behind one interface, looked up by method name."""

from __future__ import annotations

from quantkit.errors import OptionError
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
        raise OptionError(f"unknown method {method!r}; available: {', '.join(QUANTIZERS)}") from None
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - set(cls.__dataclass_fields__))
    if unknown:
        raise OptionError(f"method {method!r} has no option {_flags(unknown)}; its options: "
                          f"{_flags(cls.__dataclass_fields__) or 'none'}")
    return cls(**given)


def _flags(names) -> str:
    return ", ".join("--" + name.replace("_", "-") for name in names)


__all__ = ["LayerStats", "Quantizer", "QUANTIZERS", "make_quantizer"]
