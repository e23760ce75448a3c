"""Fused int4/int8 dequantize-GEMM on CPU through the C kernels of ``csrc/cpu_qgemm.c``.

Small batches (decode) run the fused GEMV, which reads each packed weight once and never forms a float
weight. Larger batches (prefill) dequantize slabs of rows into a cache-sized float32 buffer and multiply
them with torch's GEMM, so they run at dense speed plus a small unpacking cost.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

BLOCK = 32
GEMV_MAX_ROWS = 16
SLAB_BYTES = 16 * 1024 * 1024


def block_order(in_features: int) -> torch.Tensor:
    """Column order the 4-bit kernel expects: in each block of 32, even columns first, then odd ones."""
    return torch.arange(in_features).view(-1, BLOCK // 2, 2).transpose(1, 2).reshape(-1)


@dataclass
class CpuIntKernel:
    """Packed weight rows plus everything the C kernels need for ``y = x @ W.T``.

    ``codes``: uint8 ``[n, k*bits/8]`` (bits 4 or 8, 4-bit as :func:`quantkit.formats.packing.pack_nibbles`); ``scales``:
    float16 or float32 ``[n, groups]``; ``zeros``: uint8 ``[n, groups]``; ``columns``: the input column
    each kernel position reads (``None`` for the natural order).
    """

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


    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(torch.float32)
        x2 = x2.index_select(1, self.columns) if self.columns is not None else x2.contiguous()
        y = self._gemv(x2) if x2.shape[0] <= GEMV_MAX_ROWS else self._slab_gemm(x2)
        return y.reshape(*lead, self.out_features).to(dtype)

    def _scale_args(self) -> tuple[int, int]:
        return self.scales.data_ptr(), int(self.scales.dtype == torch.float16)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        status = self.library.qk_gemv(
            x.data_ptr(), x.shape[0], self.in_features, self.codes.data_ptr(), *self._scale_args(),
            self.zeros.data_ptr(), self.out_features, self.group_size, self.bits, y.data_ptr(),
            torch.get_num_threads(),
        )
        _check(status)
        return y

    def _slab_gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows_per_slab = max(BLOCK, SLAB_BYTES // (4 * self.in_features))
        slab = torch.empty(min(rows_per_slab, self.out_features), self.in_features, dtype=torch.float32)
        y_t = torch.empty(self.out_features, x.shape[0], dtype=torch.float32)
        x_t = x.t()
        for begin in range(0, self.out_features, rows_per_slab):
            end = min(begin + rows_per_slab, self.out_features)
            status = self.library.qk_dequant_rows(
                self.codes.data_ptr(), *self._scale_args(), self.zeros.data_ptr(), self.in_features,
                self.group_size, self.bits, begin, end, slab.data_ptr(), torch.get_num_threads(),
            )
            _check(status)
            torch.mm(slab[: end - begin], x_t, out=y_t[begin:end])
        return y_t.t()


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"quantkit CPU kernel failed with status {status}")
