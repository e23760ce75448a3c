"""Fused int4/int8 and FP4 dequantize-GEMM on CPU through the C kernels of ``csrc/cpu_qgemm.c``.

Small batches (decode) run the fused GEMV, which reads each packed weight once and never forms a float
weight. Larger batches (prefill) dequantize slabs of rows into a cache-sized float32 buffer and multiply
them with torch's GEMM, so they run at dense speed plus a small unpacking cost.
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from quantkit_kernels.slabs import slab_rows

BLOCK = 32
GEMV_MAX_ROWS = 16


def block_order(in_features: int) -> torch.Tensor:
    """Column order the 4-bit kernel expects: in each block of 32, even columns first, then odd ones."""
    return torch.arange(in_features).view(-1, BLOCK // 2, 2).transpose(1, 2).reshape(-1)


class CpuGemm(ABC):
    """``y = x @ W.T`` through the C kernels: a fused GEMV for up to :data:`GEMV_MAX_ROWS` rows, otherwise
    slabs of rows dequantized into a float32 buffer and torch's GEMM. ``columns`` is the input column each
    kernel position reads (``None`` for the natural order)."""

    library: ctypes.CDLL
    columns: torch.Tensor | None

    @property
    @abstractmethod
    def out_features(self) -> int: ...

    @property
    @abstractmethod
    def in_features(self) -> int: ...

    @abstractmethod
    def run_gemv(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Fill ``y [m, out]`` with ``x @ W.T`` (x float32 in kernel order); the C status."""

    @abstractmethod
    def run_dequant(self, begin: int, end: int, out: torch.Tensor) -> int:
        """Write rows ``begin:end`` of ``W`` (kernel column order) into ``out``; the C status."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        x2 = x2.index_select(1, self.columns) if self.columns is not None else x2.contiguous()
        y = self._gemv(x2) if x2.shape[0] <= GEMV_MAX_ROWS else self._slab_gemm(x2)
        return y.reshape(*lead, self.out_features).to(dtype)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        _check(self.run_gemv(x, y))
        return y

    def _slab_gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows_per_slab = slab_rows(self.in_features, BLOCK)
        slab = torch.empty(min(rows_per_slab, self.out_features), self.in_features, dtype=torch.float32)
        y_t = torch.empty(self.out_features, x.shape[0], dtype=torch.float32)
        x_t = x.t()
        for begin in range(0, self.out_features, rows_per_slab):
            end = min(begin + rows_per_slab, self.out_features)
            _check(self.run_dequant(begin, end, slab))
            torch.mm(slab[: end - begin], x_t, out=y_t[begin:end])
        return y_t.t()


@dataclass
class CpuIntKernel(CpuGemm):
    """Integer weights: ``codes`` uint8 ``[n, k*bits/8]`` (bits 4 or 8, 4-bit as
    :func:`quantkit.formats.packing.pack_nibbles`), ``scales`` float16 or float32 ``[n, groups]``, ``zeros``
    uint8 ``[n, groups]``."""

    library: ctypes.CDLL
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    columns: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"the C kernels take 4- or 8-bit codes, not {self.bits}")
        if self.in_features % BLOCK or self.group_size % BLOCK:
            raise ValueError("in_features and group_size must be multiples of 32")
        if self.scales.dtype not in (torch.float16, torch.float32):
            self.scales = self.scales.float()
        self.codes, self.scales, self.zeros = (t.contiguous() for t in (self.codes, self.scales, self.zeros))

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 8 // self.bits

    def _scale_args(self) -> tuple[int, int]:
        return self.scales.data_ptr(), int(self.scales.dtype == torch.float16)

    def run_gemv(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return self.library.qk_gemv(
            x.data_ptr(), x.shape[0], self.in_features, self.codes.data_ptr(), *self._scale_args(),
            self.zeros.data_ptr(), self.out_features, self.group_size, self.bits, y.data_ptr(),
            torch.get_num_threads(),
        )

    def run_dequant(self, begin: int, end: int, out: torch.Tensor) -> int:
        return self.library.qk_dequant_rows(
            self.codes.data_ptr(), *self._scale_args(), self.zeros.data_ptr(), self.in_features,
            self.group_size, self.bits, begin, end, out.data_ptr(), torch.get_num_threads(),
        )


@dataclass
class CpuFp4Kernel(CpuGemm):
    """E2M1 weights: ``packed`` uint8 ``[n, k/2]`` (two codes a byte, even column low), block ``scales``
    ``[n, k/scale_block]`` as float16 or as bytes decoded by ``lut`` (256 float32 values: E8M0 or E4M3),
    divided by ``global_scale`` when given. ``k`` a multiple of 32, ``scale_block`` 16 or a multiple of 32."""

    library: ctypes.CDLL
    packed: torch.Tensor
    scales: torch.Tensor
    lut: torch.Tensor | None
    global_scale: float | None
    scale_block: int
    columns: torch.Tensor | None

    def __post_init__(self) -> None:
        if self.in_features % BLOCK or not fp4_block_fits(self.scale_block):
            raise ValueError("in_features must be a multiple of 32 and the scale block 16 or a multiple of 32")
        if (self.lut is None) != (self.scales.dtype == torch.float16):
            raise ValueError("float16 scales take no table; byte scales need one")
        self.packed, self.scales = self.packed.contiguous(), self.scales.contiguous()

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def in_features(self) -> int:
        return self.packed.shape[1] * 2

    def _scale_args(self) -> tuple[int, int | None, float]:
        lut = None if self.lut is None else self.lut.data_ptr()
        return self.scales.data_ptr(), lut, 0.0 if self.global_scale is None else self.global_scale

    def run_gemv(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return self.library.qk_fp4_gemv(
            x.data_ptr(), x.shape[0], self.in_features, self.packed.data_ptr(), *self._scale_args(),
            self.out_features, self.scale_block, y.data_ptr(), torch.get_num_threads(),
        )

    def run_dequant(self, begin: int, end: int, out: torch.Tensor) -> int:
        return self.library.qk_fp4_dequant_rows(
            self.packed.data_ptr(), *self._scale_args(), self.in_features, self.scale_block, begin, end,
            out.data_ptr(), torch.get_num_threads(),
        )


def fp4_block_fits(scale_block: int) -> bool:
    """Whether the FP4 C kernels handle blocks of ``scale_block`` columns."""
    return scale_block == 16 or (scale_block > 0 and scale_block % BLOCK == 0)


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"quantkit CPU kernel failed with status {status}")
