"""QuantLinear: a linear layer holding its weight in packed quantized form."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.formats.base import QuantizedTensor, tensor_class


class QuantLinear(nn.Module):
    """Stores the packed tensors of one format as buffers; forward dequantizes, then multiplies.

    The plain dequantize path is the reference that faster kernels are checked against.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, meta: dict, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.meta = in_features, out_features, meta
        self.tensor_class = tensor_class(meta["kind"])
        self.tensor_names = []
        for name, (shape, tensor_dtype) in self.tensor_class.expected_tensors(meta, self.shape).items():
            self.register_buffer(name, torch.empty(shape, dtype=tensor_dtype, device="meta"))
            self.tensor_names.append(name)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device="meta"), requires_grad=False) if bias else None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def quantized(self) -> QuantizedTensor:
        """The stored weight as its format's object."""
        return self.tensor_class.from_tensors({n: getattr(self, n) for n in self.tensor_names}, self.meta, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized().dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.meta['kind']}"
