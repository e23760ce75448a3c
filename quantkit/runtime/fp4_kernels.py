"""Serving FP4 (E2M1) layers on CPU (quantkit's C kernels, else rows decoded per call) or through Triton.

The C kernels (:class:`quantkit_kernels.cpu_int.CpuFp4Kernel`) read the packed codes in place: decode runs a
fused GEMV that turns nibbles into values with one AVX2 permute (exact, backend ``cpu``) or, with int8
activations (``cpu-int8``), the integer kernels on the codes ``2 * value + 12`` (a byte-table shuffle), from a
16-row tiled copy on AVX-512; prefill dequantizes slabs of rows for torch's GEMM. Where they do not fit (inputs not a multiple of 32, blocks that are neither 16 nor a multiple
of 32, no compiler), each byte of ``weight_packed`` becomes its two float32 values through a 256-entry table,
times the block scales, a slab of rows at a time. No float copy of the model is kept either way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from quantkit.formats.e2m1 import SCALE_CODECS, e2m1_decode
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit_kernels.slabs import slab_matmul, slab_rows

if TYPE_CHECKING:
    from quantkit.runtime.kernels import CpuBuild
    from quantkit_kernels.cpu_int import CpuFp4Kernel

_PAIRS = torch.stack((e2m1_decode(torch.arange(256) & 15), e2m1_decode(torch.arange(256) >> 4)), dim=1)


def c_kernel(build: CpuBuild | None, qt: FloatQuantizedTensor, stored: dict[str, torch.Tensor],
             activations: str = "float") -> CpuFp4Kernel | None:
    """The C kernel for this layer with ``activations`` in decode, or None where it does not fit (or the
    library could not be built)."""
    from quantkit_kernels.cpu_int import BLOCK, CpuFp4Kernel, block_order, fp4_block_fits

    in_features = qt.shape[1]
    if build is None or in_features % BLOCK or not fp4_block_fits(qt.block):
        return None
    codec = SCALE_CODECS[qt.scheme.format]
    scales = stored["weight_scale"]
    lut = None
    if scales.element_size() == 1:
        lut = codec.decode(torch.arange(256, dtype=torch.uint8).view(codec.dtype)).contiguous()
        scales = scales.view(torch.uint8)
    global_scale = None if qt.global_scale is None else float(qt.global_scale)
    return CpuFp4Kernel(build.library, block_order(in_features), build.isa, build.prefill, stored["weight_packed"],
                        scales, lut, global_scale, qt.block, codec.name, activations)


class FloatSlabKernel:
    """CPU FP4 without the C kernels: per call, slabs of rows are decoded to float32 and multiplied."""

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
