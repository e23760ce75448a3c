"""What a quantized layer costs on disk, counted exactly as the exporter of each layout writes it, and the
byte budget of an average-bits target."""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch

from quantkit.errors import QuantkitError
from quantkit.export import compressed_tensors_format as ct
from quantkit.export import gptq_format as gptq
from quantkit.formats.base import QuantizedTensor, TensorSpec, tensor_class
from quantkit.schemes import QuantScheme


def _size(specs: dict[str, TensorSpec]) -> int:
    return sum(math.prod(size) * dtype.itemsize for size, dtype in specs.values())


@dataclass(frozen=True)
class LayerCost:
    """Bytes of the tensors a quantized layer writes in ``layout`` (codes, scales, zeros, indices), from its
    meta and ``(out, in)`` shape; compressed-tensors stores integer scales in the model's dtype."""

    layout: str = "native"
    model_dtype: torch.dtype = torch.float32

    def __call__(self, meta: dict, shape: tuple[int, int]) -> int:
        if self.layout == "gptq":  # always with g_idx, float16 scales
            scheme = QuantScheme(int(meta["bits"]), int(meta["group_size"]))
            return _size(gptq.expected_tensors(scheme.bits, scheme.num_groups(shape[1]), shape, torch.float16,
                                               with_g_idx=True))
        if self.layout == "compressed-tensors" and meta["kind"] == "int":
            args = ct.WeightArgs(int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"]), g_idx=False)
            scale_dtype = torch.float16 if self.model_dtype.itemsize <= 2 else self.model_dtype
            return _size(ct.expected_tensors(args, shape, scale_dtype))
        return _size(tensor_class(meta["kind"]).expected_tensors(meta, shape))

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
