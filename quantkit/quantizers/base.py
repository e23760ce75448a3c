"""The quantizer interface: one linear layer's weight and statistics in, a QuantizedTensor out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantkit import defaults
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorPlan, tensor_kind
from quantkit.schemes import QuantScheme


@dataclass
class LayerStats:
    """What calibration measured at one linear layer's input.

    ``hessian`` is ``2/n * sum(x x^T)`` over the ``n`` calibration tokens, in float64 (None when the
    quantizer does not ask for calibration). ``clip`` is a learned clipping ratio per output row (from a
    transform) that grid-based quantizers apply to every group's range.
    """

    hessian: torch.Tensor | None = None
    tokens: int = 0
    clip: torch.Tensor | None = None


class Quantizer(ABC):
    """Turns a float weight ``[out, in]`` into a quantized tensor; knows nothing of models or files."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool]
    # The scheme a user gets without asking for a group size or symmetry.
    default_group_size: ClassVar[int] = 128
    default_symmetric: ClassVar[bool] = True
    min_group_size: ClassVar[int] = 1
    any_format: ClassVar[bool] = True  # whether it rounds onto every number format (FP4, GGUF), not only int

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> QuantizedTensor:
        """Quantize one weight matrix under ``scheme``."""

    def quantize_together(self, weights: Sequence[torch.Tensor], stats: Sequence[LayerStats],
                          scheme: QuantScheme) -> list[QuantizedTensor]:
        """Quantize layers that are ready at the same time under one scheme (a quantizer may solve them as one
        batch); one at a time unless overridden."""
        return [self.quantize(weight, layer, scheme) for weight, layer in zip(weights, stats)]

    def default_scheme(self, bits: int | None = None, group_size: int | None = None, symmetric: bool | None = None,
                       fmt: str = defaults.NUMBER_FORMAT, block_rows: int = 1) -> QuantScheme:
        """``bits`` in number format ``fmt``, with this quantizer's (or the format's) usual group size and
        symmetry, and the format's usual width, where they are not given."""
        return QuantScheme.for_format(fmt, bits, group_size, symmetric, self.default_group_size, self.default_symmetric,
                                      block_rows)

    def plan(self, scheme: QuantScheme) -> TensorPlan:
        """What it makes of any weight under ``scheme``, known before it sees one (what layouts check and count)."""
        return TensorPlan(tensor_kind(scheme), scheme)

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Refuse, before any work, a scheme this quantizer cannot use: a number format it does not round
        onto, groups below ``min_group_size``."""
        if scheme.format != "int" and not self.any_format:
            raise QuantkitError(f"method {self.name} works on integer grids only, not {scheme.format}")
        if scheme.group_size != -1 and scheme.group_size < self.min_group_size:
            raise QuantkitError(
                f"{self.name} group size {scheme.group_size} makes no sense: its statistics would cost more than "
                f"the weights; use {self.min_group_size} or more (or -1 for per-channel)"
            )

    @abstractmethod
    def options(self, scheme: QuantScheme) -> dict:
        """The settings that, with ``scheme``, reproduce this quantizer, automatic ones resolved for ``scheme``
        (recorded in checkpoints)."""
