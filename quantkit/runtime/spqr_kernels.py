"""Serving SpQR layers: ``y = x @ dense.T + x @ D.T`` without ever holding a float copy of the model.

``D`` is sparse: at each outlier position it holds ``outlier value - dense value`` (float32, computed once),
so the two terms add up to the stored weight exactly. The dense part runs either on CPU through quantkit's C
kernels (codes as 4-bit or 8-bit, the 3-bit statistics decoded once at load into per-group float32 scales and
zero points), or on CUDA through the fused Triton kernel of ``quantkit_kernels.triton_spqr``.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from quantkit.formats.packing import pack_nibbles, unpack_nibbles
from quantkit.formats.spqr import MIN_SCALE, SpQRQuantizedTensor, dense_weight, first_level_statistics
from quantkit_kernels.slabs import slab_matmul, slab_rows

if TYPE_CHECKING:
    from quantkit.runtime.kernels import CpuBuild


class OutlierCorrection:
    """``x @ D.T`` for the sparse correction ``D`` of an SpQR layer, in CSR on the layer's device."""

    def __init__(self, qt: SpQRQuantizedTensor, device: torch.device) -> None:
        out_features, in_features = qt.shape
        rows, columns = qt.outliers.rows(), qt.outliers.columns
        position = torch.argsort(qt.perm) if qt.perm is not None else torch.arange(in_features, device=qt.codes.device)
        permuted = position[columns]
        size = qt.scheme.group_columns(in_features)
        groups = permuted // size
        scales, zeros = qt.statistics()
        dense = scales[groups, rows] * (qt.codes[rows, permuted].float() - zeros[groups, rows])
        delta = qt.outliers.values.float() - dense
        self.count = qt.outliers.count
        with warnings.catch_warnings():  # torch calls its CSR support beta on every construction
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            self.matrix = torch.sparse_csr_tensor(
                qt.outliers.row_offsets.long(), columns, delta, size=(out_features, in_features),
                check_invariants=True,
            ).to(device)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + x @ D.T`` for ``x [m, in]`` and ``y [m, out]`` (float32 arithmetic)."""
        if not self.count:
            return y
        return y + (self.matrix @ x.float().t()).t().to(y.dtype)


class SpQRCpuKernel:
    """CPU SpQR: the dense part through the C kernels (``build``), its first-level statistics decoded once at
    load into float32 scales and zero points, with ``activations`` float or int8 in decode; where those do not
    fit, slabs of dense rows decoded per call and torch's GEMM. Then the outliers' correction."""

    def __init__(self, qt: SpQRQuantizedTensor, build: CpuBuild | None, activations: str = "float") -> None:
        from quantkit_kernels.cpu_int import BLOCK, CpuIntKernel

        self.out_features, self.in_features = qt.shape
        self.correction = OutlierCorrection(qt, torch.device("cpu"))
        self.block, self.group_columns, self.bits = qt.stat_group_size, qt.scheme.group_columns(qt.shape[1]), qt.scheme.bits
        self.perm = qt.perm
        size = self.group_columns
        self.fused: CpuIntKernel | None = None
        if build is not None and self.in_features % BLOCK == 0 and (size == 16 or size % BLOCK == 0):
            scales, zeros = qt.statistics()
            self.fused = CpuIntKernel.from_codes(
                build.library, build.isa, build.prefill, qt.codes, scales.t().contiguous(), zeros.t().contiguous(),
                size, 4 if self.bits <= 4 else 8, self.perm, activations)
            return
        self.packed = self.bits <= 4
        self.codes = pack_nibbles(qt.codes) if self.packed else qt.codes.contiguous()
        self.scale_stats, self.zero_stats = qt.scale_stats, qt.zero_stats
        self.slab_rows = slab_rows(self.in_features, self.block)

    def _dense_rows(self, begin: int, end: int) -> torch.Tensor:
        stored = self.codes[begin:end]
        if self.packed:
            stored = unpack_nibbles(stored, self.in_features)
        scale_stats = self.scale_stats.rows(begin, end, self.block)
        zero_stats = self.zero_stats.rows(begin, end, self.block) if self.zero_stats is not None else None
        scales, zeros = first_level_statistics(scale_stats, zero_stats, self.bits, self.block)
        return dense_weight(stored, scales, zeros, self.group_columns)

    def __repr__(self) -> str:
        dense = repr(self.fused) if self.fused is not None else "slabs decoded per call"
        return f"SpQRCpuKernel({dense}, outliers={self.correction.count})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features).float()
        if self.fused is not None:
            y = self.fused(x2)
        else:
            xp = x2[:, self.perm] if self.perm is not None else x2
            y = slab_matmul(xp, self.out_features, self.slab_rows, self._dense_rows)
        return self.correction.add_to(y, x2).to(dtype).reshape(*lead, self.out_features)


class SpQRTritonKernel:
    """CUDA SpQR (or CPU under ``TRITON_INTERPRET=1``): the fused Triton dense kernel plus the CSR correction.

    3-bit codes run as 4-bit ones; symmetric ones are shifted by 4 so that ``code - 4`` becomes
    ``(code + 4) - 8``, the kernel's symmetric zero for the 4 bits it unpacks.
    """

    def __init__(self, qt: SpQRQuantizedTensor, device: torch.device) -> None:
        from quantkit.formats.packing import pack_rows

        self.out_features, self.in_features = qt.shape
        bits = self.kernel_bits(qt.scheme.bits)
        self.bits, self.group_size, self.block = bits, qt.scheme.group_size, qt.stat_group_size
        self.symmetric = qt.zero_stats is None
        codes = qt.codes
        if self.symmetric:
            codes = codes + (2 ** (bits - 1) - 2 ** (qt.scheme.bits - 1))
        self.qweight = pack_rows(codes, bits).to(device)
        self.scale = tuple(t.to(device) for t in (qt.scale_stats.codes, qt.scale_stats.scale, qt.scale_stats.zero))
        self.zero = (None,) * 3 if qt.zero_stats is None else tuple(
            t.to(device) for t in (qt.zero_stats.codes, qt.zero_stats.scale, qt.zero_stats.zero))
        self.perm = qt.perm.to(device) if qt.perm is not None else None
        self.correction = OutlierCorrection(qt, device)

    @staticmethod
    def kernel_bits(bits: int) -> int:
        """The code width the kernel unpacks for ``bits``-bit codes."""
        return 4 if bits == 3 else bits

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit_kernels.triton_spqr import spqr_matmul

        x2 = x.reshape(-1, self.in_features)
        xp = x2[:, self.perm] if self.perm is not None else x2
        y = spqr_matmul(xp, self.qweight, *self.scale, *self.zero, self.bits, self.group_size, self.block,
                        self.symmetric, MIN_SCALE)
        return self.correction.add_to(y, x2).reshape(*x.shape[:-1], self.out_features)

