"""What a quantized layer costs on disk, counted by its layout exactly as it writes it, and the byte budget of an
average-bits target."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.layouts import get_layout


@dataclass(frozen=True)
class LayerCost:
    """Bytes of the tensors a quantized layer writes in ``layout`` (codes, scales, zeros, indices), from its
    meta and ``(out, in)`` shape, as the layout counts them for a model in ``model_dtype``."""

    layout: str = "native"
    model_dtype: torch.dtype = torch.float32

    def __call__(self, meta: dict, shape: tuple[int, int]) -> int:
        return get_layout(self.layout).nbytes(meta, shape, self.model_dtype)

    def of(self, qt: QuantizedTensor) -> int:
        """Bytes ``qt`` writes."""
        return self(qt.meta(), qt.shape)


def exact_fraction(value: float) -> Fraction:
    """``value`` as the decimal the user typed (3.3 is 33/10, not the nearest binary float)."""
    return Fraction(repr(float(value)))


def check_target(target_bits: float) -> None:
    """Refuse an average-bits target that is not a finite positive number."""
    if not (isinstance(target_bits, (int, float)) and math.isfinite(target_bits) and target_bits > 0):
        raise QuantkitError(f"the average bits target must be a positive number, got {target_bits}")


def budget_bytes(target_bits: float, weights: int) -> int:
    """The most bytes that keep ``weights`` quantized weights at or under ``target_bits`` per weight."""
    check_target(target_bits)
    return math.floor(exact_fraction(target_bits) * weights / 8)


def bits_per_weight(nbytes: int, weights: int) -> float:
    """Average bits per quantized weight of ``nbytes`` written for ``weights`` weights."""
    return 8 * nbytes / weights
