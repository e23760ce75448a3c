"""The quantizer interface: one linear layer's weight and statistics in, a QuantizedTensor out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from quantkit.formats.base import QuantizedTensor
from quantkit.schemes import QuantScheme


@dataclass
class LayerStats:
    """What calibration measured at one linear layer's input.

    ``hessian`` is ``2/n * sum(x x^T)`` over the ``n`` calibration tokens, in float64 (None when the
    quantizer does not ask for calibration).
    """

    hessian: torch.Tensor | None = None
    tokens: int = 0


class Quantizer(ABC):
    """Turns a float weight ``[out, in]`` into a quantized tensor; knows nothing of models or files."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool]

    @abstractmethod
    def quantize(self, weight: torch.Tensor, stats: LayerStats, scheme: QuantScheme) -> QuantizedTensor:
        """Quantize one weight matrix under ``scheme``."""

    def column_groups(self, scheme: QuantScheme) -> bool:
        """Whether the tensors it makes under ``scheme`` assign columns to groups out of order (act-order ``g_idx``)."""
        return False

    @abstractmethod
    def options(self) -> dict:
        """The settings that, with the scheme, reproduce this quantizer (recorded in checkpoints)."""
