"""Serving SpQR layers: ``y = x @ dense.T + x @ D.T`` without ever holding a float copy of the model.

``D`` is sparse: at each outlier position it holds ``outlier value - dense value`` (float32, computed once),
so the two terms add up to the stored weight exactly. The dense part runs either on CPU through quantkit's C
kernels (codes as 4-bit or 8-bit; the int8 decode on AVX-512 reads 2- and 3-bit codes packed at 3 bits and
the 3-bit statistics of each 16-row tile and group as one 32-byte record, decoded in registers; every other
path per-group float32 scales and zero points decoded once at load), or on CUDA through the fused Triton kernel of
``quantkit_kernels.triton_spqr``. On CPU the correction of decode batches runs in C too.
"""

from __future__ import annotations

import warnings
from functools import cached_property
from typing import TYPE_CHECKING

import torch

from quantkit.formats.packing import pack_nibbles, unpack_nibbles
from quantkit.formats.spqr import MIN_SCALE, SpQRQuantizedTensor, dense_weight, first_level_statistics
from quantkit_kernels.slabs import slab_matmul, slab_rows

if TYPE_CHECKING:
    import ctypes

    from quantkit.runtime.kernels import CpuBuild
    from quantkit_kernels.cpu_int import DecodeGemv


class OutlierCorrection:
    """``x @ D.T`` for the sparse correction ``D`` of an SpQR layer, kept in CSR as int32 ``offsets``, unsigned
    16-bit ``columns`` (stored as int16) and float32 ``deltas``: decode batches through the C kernels when
    ``library`` is given, otherwise torch's CSR product on the layer's device."""

    def __init__(self, qt: SpQRQuantizedTensor, device: torch.device, library: ctypes.CDLL | None = None) -> None:
        out_features, in_features = qt.shape
        rows, columns = qt.outliers.rows(), qt.outliers.columns
        position = torch.argsort(qt.perm) if qt.perm is not None else torch.arange(in_features, device=qt.codes.device)
        permuted = position[columns]
        size = qt.scheme.group_columns(in_features)
        groups = permuted // size
        scales, zeros = qt.statistics()
        dense = scales[groups, rows] * (qt.codes[rows, permuted].float() - zeros[groups, rows])
        self.deltas = (qt.outliers.values.float() - dense).contiguous()
        self.offsets = qt.outliers.row_offsets.to(torch.int32).contiguous()
        self.columns = columns.to(torch.int32).to(torch.int16).contiguous()
        self.count, self.shape, self.device, self.library = qt.outliers.count, qt.shape, device, library

    @cached_property
    def matrix(self) -> torch.Tensor:
        """``D`` as a torch CSR tensor on the layer's device (built on first use: decode never needs it)."""
        with warnings.catch_warnings():  # torch calls its CSR support beta on every construction
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            return torch.sparse_csr_tensor(
                self.offsets.long(), self.columns.long() & 0xFFFF, self.deltas, size=self.shape, check_invariants=True,
            ).to(self.device)

    def add_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + x @ D.T`` for ``x [m, in]`` and ``y [m, out]`` (float32 arithmetic; a float32 ``y`` of a decode
        batch is updated in place)."""
        from quantkit_kernels.cpu_int import GEMV_MAX_ROWS, csr_add

        if not self.count:
            return y
        if self.library is None or x.shape[0] > GEMV_MAX_ROWS or y.dtype != torch.float32 or not y.is_contiguous():
            return y + (self.matrix @ x.float().t()).t().to(y.dtype)
        csr_add(self.library, self.offsets, self.columns, self.deltas, x.float().contiguous(), y)
        return y


def _statistic_records(qt: SpQRQuantizedTensor) -> torch.Tensor:
    """The C ``qk_spqr_stats`` records ``[tiles, groups, 32]`` (uint8) of a layer whose second-level statistics
    cover blocks of 16 rows: per tile and group, each row's scale code | zero code << 4, then the (float16)
    scale and zero of the scale codes and of the zero codes as float32 (zeros when symmetric)."""
    from quantkit_kernels.cpu_int import tile_rows

    scale, zero = qt.scale_stats, qt.zero_stats
    codes = scale.codes if zero is None else scale.codes | (zero.codes << 4)
    second = (scale.scale, scale.zero) + ((zero.scale, zero.zero) if zero is not None else (torch.zeros_like(scale.scale),) * 2)
    values = torch.stack([t.to(torch.float16).float().t() for t in second], dim=2).contiguous()  # [tiles, groups, 4]
    return torch.cat([tile_rows(codes.t()), values.view(torch.uint8)], dim=2).contiguous()


def tiled_statistics_decode(qt: SpQRQuantizedTensor, library: ctypes.CDLL) -> DecodeGemv | None:
    """The int8 decode GEMV of the dense part from 16-row tiles of codes and :func:`_statistic_records`, on builds
    with tiles, for statistics of at most 4 bits shared by blocks of 16 rows (None otherwise)."""
    from quantkit_kernels.cpu_build import SCALE_FORMATS, QkWeight
    from quantkit_kernels.cpu_int import TILE_ROWS, DecodeGemv, tile_codes

    bits = 3 if qt.scheme.bits <= 3 else 4 if qt.scheme.bits == 4 else 8  # 2- and 3-bit codes in 3-bit tiles
    if qt.stat_group_size != TILE_ROWS or qt.stat_bits > 4 or not library.qk_tile_rows(bits):
        return None
    out_features, in_features = qt.shape
    codes, records = tile_codes(qt.codes, bits), _statistic_records(qt)
    zeros = None if qt.zero_stats is None else records.data_ptr()
    weight = QkWeight(codes.data_ptr(), records.data_ptr(), zeros, out_features, in_features,
                      qt.scheme.group_columns(in_features), bits, 0, 0, SCALE_FORMATS["spqr"], None,
                      float(2 ** (qt.scheme.bits - 1)), 0.0, MIN_SCALE)
    return DecodeGemv(library.qk_gemv_q8_tiled, weight, (codes, records), qt.perm, True)


class SpQRCpuKernel:
    """CPU SpQR: the dense part through the C kernels (``build``), with ``activations`` float or int8 in decode:
    the int8 decode reads compact statistics where :func:`tiled_statistics_decode` applies, every other path
    first-level statistics decoded once at load into float32 scales and zero points; where the C kernels do not
    fit, slabs of dense rows decoded per call and torch's GEMM. Then the outliers' correction."""

    def __init__(self, qt: SpQRQuantizedTensor, build: CpuBuild | None, activations: str = "float") -> None:
        from quantkit_kernels.cpu_int import BLOCK, CpuIntKernel

        self.out_features, self.in_features = qt.shape
        self.correction = OutlierCorrection(qt, torch.device("cpu"), None if build is None else build.library)
        self.block, self.group_columns, self.bits = qt.stat_group_size, qt.scheme.group_columns(qt.shape[1]), qt.scheme.bits
        self.perm = qt.perm
        size = self.group_columns
        self.fused: CpuIntKernel | None = None
        self.records: DecodeGemv | None = None  # the int8 decode from SpQR statistic records, where built
        if build is not None and self.in_features % BLOCK == 0 and (size == 16 or size % BLOCK == 0):
            if activations == "int8":
                self.records = tiled_statistics_decode(qt, build.library)
            scales, zeros = qt.statistics()
            self.fused = CpuIntKernel.from_codes(
                build.library, build.isa, build.prefill, qt.codes, scales.t().contiguous(), zeros.t().contiguous(),
                size, 4 if self.bits <= 4 else 8, self.perm, "float" if self.records is not None else activations)
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
        decode = ", decode=int8-tiled with SpQR statistics" if self.records is not None else ""
        return f"SpQRCpuKernel({dense}{decode}, outliers={self.correction.count})"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from quantkit_kernels.cpu_int import GEMV_MAX_ROWS

        lead, dtype = x.shape[:-1], x.dtype
        x2 = x.reshape(-1, self.in_features).float()
        if self.records is not None and x2.shape[0] <= GEMV_MAX_ROWS:
            y = self.records.product(x2)
        elif self.fused is not None:
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

