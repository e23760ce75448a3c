"""Quantized tensor types and bit packing. Importing this package registers every format."""

from quantkit.formats.base import QuantizedTensor, tensor_class
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.spqr import SpQRQuantizedTensor

__all__ = ["FloatQuantizedTensor", "IntQuantizedTensor", "QuantizedTensor", "SpQRQuantizedTensor", "tensor_class"]
