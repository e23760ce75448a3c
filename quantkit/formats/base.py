"""The contract between quantizers, exporters and the runtime: a quantized weight and its tensors.

Each number format is a :class:`QuantizedTensor` subclass registered under a ``kind`` name. A checkpoint
records the kind and :meth:`QuantizedTensor.meta` of every quantized linear; the loader asks the kind which
tensors (names, shapes, dtypes) to expect before it reads any data, then rebuilds the object with
:meth:`QuantizedTensor.from_tensors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from quantkit.errors import QuantkitError

TensorSpec = tuple[tuple[int, ...], torch.dtype]

_REGISTRY: dict[str, type[QuantizedTensor]] = {}


class QuantizedTensor(ABC):
    """A quantized ``[out_features, in_features]`` weight matrix in one number format."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.kind] = cls

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the dequantized weight."""

    @abstractmethod
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the quantized tensor represents, as a dense matrix."""

    @abstractmethod
    def meta(self) -> dict:
        """JSON-serialisable description (``kind`` included) that, with the shape, fixes the tensor layout."""

    @abstractmethod
    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The packed tensors to store, keyed by their name relative to the layer."""

    @classmethod
    @abstractmethod
    def expected_tensors(cls, meta: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        """Names, shapes and dtypes that :meth:`to_tensors` writes for a layer with this meta and shape."""

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> QuantizedTensor:
        """Rebuild from stored tensors (already validated against :meth:`expected_tensors`)."""


def tensor_class(kind: str) -> type[QuantizedTensor]:
    """The registered class for a ``kind`` name recorded in a checkpoint."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise QuantkitError(
            f"unknown quantized tensor kind {kind!r}; this quantkit knows: {', '.join(sorted(_REGISTRY))}"
        ) from None
