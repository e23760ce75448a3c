"""The contract between quantizers, exporters and the runtime: a quantized weight and its tensors.

Each number format is a :class:`QuantizedTensor` subclass registered under a ``kind`` name. A checkpoint
records the kind and :meth:`QuantizedTensor.meta` of every quantized linear; the loader asks the kind which
tensors (names, shapes, dtypes) to expect before it reads any data, then rebuilds the object with
:meth:`QuantizedTensor.from_tensors`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from quantkit.errors import QuantkitError
from quantkit.schemes import QuantScheme

TensorSpec = tuple[tuple[int, ...], torch.dtype]
# What a stored tensor holds, for size breakdowns.
ROLES = ("codes", "statistics", "outliers", "permutation", "transform", "other")

_REGISTRY: dict[str, type[QuantizedTensor]] = {}


class QuantizedTensor(ABC):
    """A quantized ``[out_features, in_features]`` weight matrix in one number format."""

    kind: ClassVar[str]
    roles: ClassVar[dict[str, str]]  # stored tensor name -> what it holds (one of ROLES)

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
    def planned_meta(cls, plan: TensorPlan, shape: tuple[int, int]) -> dict:
        """The :meth:`meta` of a tensor ``plan`` will make from a ``shape`` weight, as far as it is known before
        the data (with the shape, it fixes the stored bytes; a lower bound when ``plan.data_dependent``)."""
        return {"kind": cls.kind, **plan.scheme.to_dict(), **plan.extra}

    @classmethod
    @abstractmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> QuantizedTensor:
        """Rebuild from stored tensors (already validated against :meth:`expected_tensors`)."""


@dataclass(frozen=True)
class TensorPlan:
    """What a quantizer will make of any weight under ``scheme``, known before it sees one: the tensor kind,
    whether act-order assigns columns to groups out of order (``column_groups``), whether the stored bytes
    depend on the data (``data_dependent``: outliers), and kind-specific meta fields (``extra``)."""

    kind: str
    scheme: QuantScheme
    column_groups: bool = False
    data_dependent: bool = False
    extra: dict = field(default_factory=dict)

    def meta(self, shape: tuple[int, int]) -> dict:
        """The planned :meth:`QuantizedTensor.meta` for a ``shape`` weight."""
        return tensor_class(self.kind).planned_meta(self, shape)


def tensor_kind(scheme: QuantScheme) -> str:
    """The quantized tensor kind weights of ``scheme`` make (SpQR's outliers aside)."""
    return "e2m1" if scheme.is_float else "fp8" if scheme.is_fp8 else "gguf" if scheme.is_gguf else "int"


def tensor_class(kind: str) -> type[QuantizedTensor]:
    """The registered class for a ``kind`` name recorded in a checkpoint."""
    try:
        return _REGISTRY[kind]
    except KeyError:
        raise QuantkitError(
            f"unknown quantized tensor kind {kind!r}; this quantkit knows: {', '.join(sorted(_REGISTRY))}"
        ) from None
