"""Quantized tensor types and bit packing. Importing this package registers every format."""

from quantkit.formats.base import ROLES, QuantizedTensor, TensorPlan, tensor_class
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.fp8 import FP8QuantizedTensor
from quantkit.formats.gguf import GGUFQuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.spqr import SpQRQuantizedTensor

__all__ = ["ROLES", "FP8QuantizedTensor", "FloatQuantizedTensor", "GGUFQuantizedTensor", "IntQuantizedTensor", "QuantizedTensor", "SpQRQuantizedTensor", "TensorPlan",
           "tensor_class"]
