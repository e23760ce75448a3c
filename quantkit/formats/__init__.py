"""Quantized tensor types and bit packing. Importing this package registers every format."""

from quantkit.formats.base import QuantizedTensor, tensor_class
from quantkit.formats.intgrid import IntQuantizedTensor

__all__ = ["IntQuantizedTensor", "QuantizedTensor", "tensor_class"]
