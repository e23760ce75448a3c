"""Serving FP4 (E2M1) layers: decoded per call in slabs of rows on CPU, or the fused Triton kernel.

The CPU path turns each byte of ``weight_packed`` into its two float32 values with one 256-entry table,
multiplies by the block scales and hands the slab to torch's GEMM; no float copy of the model is kept.
"""

from __future__ import annotations

import torch

from quantkit.formats.e2m1 import SCALE_CODECS, e2m1_decode
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.runtime.slabs import slab_matmul, slab_rows

_PAIRS = torch.stack((e2m1_decode(torch.arange(256) & 15), e2m1_decode(torch.arange(256) >> 4)), dim=1)


class FloatCpuKernel:
    """CPU FP4: per call, slabs of rows are decoded to float32 and multiplied."""

    def __init__(self, qt: FloatQuantizedTensor, stored: dict[str, torch.Tensor]) -> None:
        self.out_features, self.in_features = qt.shape
        self.packed = stored["weight_packed"]
        self.scales = stored["weight_scale"]
        self.codec = SCALE_CODECS[qt.scheme.format]
        self.global_scale = qt.global_scale
        self.block = qt.block
        self.slab_rows = slab_rows(self.in_features)

    def _dense_rows(self, begin: int, end: int) -> torch.Tensor:
        rows = end - begin
        values = _PAIRS[self.packed[begin:end].long()].reshape(rows, -1)
        scales = self.codec.decode(self.scales[begin:end])
        if self.global_scale is not None:
            scales = scales / self.global_scale
        groups = scales.shape[1]
        padded = groups * self.block
        if values.shape[1] < padded:
            values = torch.nn.functional.pad(values, (0, padded - values.shape[1]))
        dense = values[:, :padded].reshape(rows, groups, self.block) * scales[:, :, None]
        return dense.reshape(rows, padded)[:, : self.in_features]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        y = slab_matmul(x2, self.out_features, self.slab_rows, self._dense_rows)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class FloatTritonKernel:
    """CUDA FP4 (or CPU under ``TRITON_INTERPRET=1``): :func:`quantkit_kernels.triton_fp4.fp4_matmul`."""

    def __init__(self, qt: FloatQuantizedTensor, stored: dict[str, torch.Tensor], device: torch.device) -> None:
        self.packed = stored["weight_packed"].to(device)
        scales = stored["weight_scale"].to(device)
        self.codec = SCALE_CODECS[qt.scheme.format]
        self.scales = scales.view(torch.uint8) if scales.element_size() == 1 else scales
        self.global_scale = None if qt.global_scale is None else qt.global_scale.to(device)
        self.block = qt.block

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit_kernels.triton_fp4 import fp4_matmul

        return fp4_matmul(x, self.packed, self.scales, self.global_scale, self.block, self.codec.name)
