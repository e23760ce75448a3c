"""Fused int4/int8 and FP4 dequantize-GEMM on CPU through the C kernels of ``csrc/cpu_qgemm.c``.

Small batches (decode) run the fused GEMV, which reads each packed weight once and never forms a float
weight; with ``activations="int8"`` the activations are first rounded to int8 per block of 32 and every block
product is an integer dot product. Larger batches (prefill) dequantize slabs of rows into a cache-sized
buffer and multiply them with torch's GEMM in the prefill dtype (bfloat16 where the CPU has native bf16,
see :func:`quantkit_kernels.cpu_isa.prefill_dtype`), so they run at dense speed plus a small unpacking cost.
"""

from __future__ import annotations

import ctypes
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from quantkit.formats.packing import unpack_nibbles
from quantkit_kernels.cpu_build import SCALE_FORMATS, QkWeight
from quantkit_kernels.slabs import slab_rows

BLOCK = 32
GEMV_MAX_ROWS = 16
ACTIVATIONS = ("float", "int8")


def block_order(in_features: int) -> torch.Tensor:
    """Column at each kernel position for quantkit's native 4-bit packing (byte ``j`` of a 32-column block holds
    columns ``2j`` and ``2j+1``, which the kernel reads as positions ``j`` and ``j + 16``)."""
    return torch.arange(in_features).view(-1, BLOCK // 2, 2).transpose(1, 2).reshape(-1)


def pack_positions(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``[n, k]`` in kernel position order packed as the kernel reads them: byte ``j`` of each block
    of 32 holds position ``j`` in its low nibble and ``j + 16`` in its high one."""
    blocks = codes.to(torch.uint8).reshape(codes.shape[0], -1, 2, BLOCK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(codes.shape[0], -1).contiguous()


TILE_ROWS = 16
_SCRATCH = threading.local()


def scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A reusable buffer of ``numel`` elements for this thread: a fresh slab on every call would be fresh pages,
    whose first touch costs as much as a small layer's GEMM."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buffer = buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def tile_rows(t: torch.Tensor) -> torch.Tensor:
    """Per-row statistics ``[n, groups]`` as the tiled kernels read them: ``[tiles, groups, 16]``, the last tile
    padded with zeros."""
    n, groups = t.shape
    tiles = -(-n // TILE_ROWS)
    padded = torch.zeros(tiles * TILE_ROWS, groups, dtype=t.dtype)
    padded[:n] = t
    return padded.view(tiles, TILE_ROWS, groups).transpose(1, 2).contiguous()


def tile_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``[n, k]`` (one a byte, kernel position order) in the tiled layout of ``qk_gemv_q8_tiled``: per tile
    of 16 rows, block of 32 positions and octet of positions, each row's four-byte quads; 3-bit codes in two
    planes of low bits and one of third bits per block (see cpu_qgemm.c)."""
    n, k = codes.shape
    tiles = -(-n // TILE_ROWS)
    padded = torch.zeros(tiles * TILE_ROWS, k, dtype=torch.uint8)
    padded[:n] = codes
    # [tile, row, block, octet, half (positions 0-3 or 4-7 of the octet), quad position]
    quads = padded.view(tiles, TILE_ROWS, k // BLOCK, 4, 2, 4)
    halves = quads.permute(0, 2, 3, 4, 1, 5)  # tile, block, octet, half, row, quad position
    if bits == 4:
        return (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).contiguous().view(tiles, -1)
    if bits == 3:
        low, high = halves & 3, halves >> 2
        planes = [low[:, :, 2 * p, 0] | (low[:, :, 2 * p, 1] << 2) | (low[:, :, 2 * p + 1, 0] << 4)
                  | (low[:, :, 2 * p + 1, 1] << 6) for p in range(2)]
        third = sum(high[:, :, o, h] << (2 * o + h) for o in range(4) for h in range(2))
        return torch.stack([*planes, third.to(torch.uint8)], dim=2).contiguous().view(tiles, -1)
    return halves.contiguous().view(tiles, -1)


class DecodeGemv(NamedTuple):
    """A decode GEMV bound to its weight: the C function, the weight structure, the tensors it points into
    (beyond the kernel's own), the input column at each position it reads (None: natural order), and whether
    it reads 16-row tiles."""

    gemv: Callable[..., int]
    weight: QkWeight
    tensors: tuple[torch.Tensor, ...]
    columns: torch.Tensor | None
    tiled: bool

    def run(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Fill ``y [m, out]`` with the product of ``x`` (float32, kernel order); the C status."""
        return self.gemv(self.weight, x.data_ptr(), x.shape[0], y.data_ptr(), torch.get_num_threads())

    def product(self, x: torch.Tensor) -> torch.Tensor:
        """``x [m, in]`` (input column order, m at most :data:`GEMV_MAX_ROWS`) times the weight, in float32."""
        if self.columns is not None:
            x = x.index_select(1, self.columns)
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        y = torch.empty((x.shape[0], self.weight.n), dtype=torch.float32)
        _check(self.run(x, y))
        return y


@dataclass
class CpuGemm(ABC):
    """``y = x @ W.T`` through the C kernels: a fused GEMV for up to :data:`GEMV_MAX_ROWS` rows, otherwise
    slabs of rows dequantized into a ``prefill``-dtype buffer and torch's GEMM. ``columns`` is the input column
    each kernel position reads (``None`` for the natural order); ``isa`` names the library's build."""

    library: ctypes.CDLL
    columns: torch.Tensor | None
    isa: str
    prefill: torch.dtype

    @property
    @abstractmethod
    def out_features(self) -> int: ...

    @property
    @abstractmethod
    def in_features(self) -> int: ...

    @property
    def decode(self) -> str:
        """The activations of the decode GEMV: ``float`` or ``int8``."""
        return "float"

    @abstractmethod
    def run_gemv(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Fill ``y [m, out]`` with ``x @ W.T`` (x float32 in kernel order); the C status."""

    @abstractmethod
    def run_dequant(self, begin: int, end: int, out: torch.Tensor) -> int:
        """Write rows ``begin:end`` of ``W`` (kernel order) into ``out`` (float32 or bfloat16); the C status."""

    @property
    def gemv_columns(self) -> torch.Tensor | None:
        """The input column at each position the decode GEMV reads (``None``: the natural order)."""
        return self.columns

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= GEMV_MAX_ROWS:  # decode: every step of a token counts, so nothing is done twice
            columns = self.gemv_columns
            if columns is not None:
                x2 = x2.index_select(1, columns)
            if x2.dtype is not torch.float32 or not x2.is_contiguous():
                x2 = x2.to(torch.float32).contiguous()
            y = torch.empty((x2.shape[0], self.out_features), dtype=torch.float32)
            _check(self.run_gemv(x2, y))
        else:
            if self.columns is not None:
                x2 = x2.index_select(1, self.columns)
            y = self._slab_gemm(x2.to(self.prefill))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if y.dtype is x.dtype else y.to(x.dtype)

    def _slab_gemm(self, x: torch.Tensor) -> torch.Tensor:
        rows_per_slab = slab_rows(self.in_features, BLOCK)
        slab = scratch(min(rows_per_slab, self.out_features) * self.in_features, x.dtype).view(-1, self.in_features)
        y_t = torch.empty(self.out_features, x.shape[0], dtype=x.dtype)
        x_t = x.t()
        for begin in range(0, self.out_features, rows_per_slab):
            end = min(begin + rows_per_slab, self.out_features)
            _check(self.run_dequant(begin, end, slab))
            torch.mm(slab[: end - begin], x_t, out=y_t[begin:end])
        return y_t.t().contiguous()  # callers may view the output's last dimension (complex RoPE does)

    def __repr__(self) -> str:
        prefill = str(self.prefill).removeprefix("torch.")
        return (f"{type(self).__name__}({self.out_features}x{self.in_features}, isa={self.isa}, "
                f"decode={self.decode}, prefill={prefill})")


@dataclass(repr=False)
class CpuIntKernel(CpuGemm):
    """Integer weights: ``codes`` uint8 ``[n, k*bits/8]`` in kernel position order (4-bit as
    :func:`pack_positions`), ``scales`` float16 or float32 ``[n, groups]``, ``zeros`` uint8 or float32
    ``[n, groups]``; groups of 16 positions or a multiple of 32. ``activations``: the decode GEMV's, float32
    (exact) or int8 blocks."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    activations: str = "float"
    _weight: QkWeight = field(init=False)
    _decode: DecodeGemv = field(init=False)  # rows of ``_weight``, or the int8 decode's 16-row tiles

    @property
    def gemv_columns(self) -> torch.Tensor | None:
        return self._decode.columns

    @property
    def tiles(self) -> DecodeGemv | None:
        """The int8 decode from 16-row tiles, where built."""
        return self._decode if self._decode.tiled else None

    @classmethod
    def from_codes(cls, library: ctypes.CDLL, isa: str, prefill: torch.dtype, codes: torch.Tensor,
                   scales: torch.Tensor, zeros: torch.Tensor, group_size: int, bits: int,
                   columns: torch.Tensor | None, activations: str = "float",
                   native_packed: torch.Tensor | None = None) -> CpuIntKernel:
        """Lay out codes ``[n, k]`` (one per byte, groups contiguous; ``columns[i]`` the input column of code
        column ``i``) for the kernel. 4-bit codes in groups of 32 or more take quantkit's native packing, read
        in place when ``native_packed`` holds it; groups of 16 take the natural order. With int8 activations on
        a build that has them, the decode GEMV reads a copy in 16-row tiles, in the natural order."""
        natural_codes, natural_columns = codes, columns
        if bits == 4 and group_size != 16:
            order = block_order(codes.shape[1])
            columns = order if columns is None else columns[order]
            codes = codes[:, order]
        packed = codes if bits == 8 else native_packed if native_packed is not None else pack_positions(codes)
        kernel = cls(library, columns, isa, prefill, packed, scales, zeros, group_size, bits, activations)
        if activations == "int8" and library.qk_tile_rows(bits):
            kernel._tile(natural_codes, natural_columns)
        return kernel

    def _tile(self, codes: torch.Tensor, columns: torch.Tensor | None) -> None:
        """Serve decode from a 16-row tiled copy of ``codes`` (``columns[i]``: the input column of code column ``i``)."""
        self.use_tiles((tile_codes(codes, self.bits), tile_rows(self.scales), tile_rows(self.zeros)), columns)

    def use_tiles(self, tensors: tuple[torch.Tensor, ...], columns: torch.Tensor | None) -> None:
        """Serve decode from ``tensors``, the tiled codes, scales and zero points of :func:`tile_codes` and
        :func:`tile_rows` (or views of a fused stack of them, see :func:`fuse_tiles`)."""
        self._decode = self.tiled_decode(tensors, self.out_features, columns)

    def tiled_decode(self, tensors: tuple[torch.Tensor, ...], rows: int, columns: torch.Tensor | None) -> DecodeGemv:
        """The int8 decode of ``rows`` rows of this kernel's geometry in the tiled ``tensors``."""
        weight = QkWeight(*(t.data_ptr() for t in tensors), rows, self.in_features, self.group_size, self.bits,
                          self._weight.half_scales, self._weight.float_zeros)
        return DecodeGemv(self.library.qk_gemv_q8_tiled, weight, tensors, columns, True)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"the C kernels take 4- or 8-bit codes, not {self.bits}")
        if self.in_features % BLOCK or not (self.group_size == 16 or self.group_size % BLOCK == 0):
            raise ValueError("in_features must be a multiple of 32 and group_size 16 or a multiple of 32")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, not {self.activations!r}")
        if self.scales.dtype not in (torch.float16, torch.float32):
            self.scales = self.scales.float()
        if self.zeros.dtype not in (torch.uint8, torch.float32):
            self.zeros = self.zeros.float()
        self.codes, self.scales, self.zeros = (t.contiguous() for t in (self.codes, self.scales, self.zeros))
        self._weight = QkWeight(self.codes.data_ptr(), self.scales.data_ptr(), self.zeros.data_ptr(),
                                self.out_features, self.in_features, self.group_size, self.bits,
                                int(self.scales.dtype == torch.float16), int(self.zeros.dtype == torch.float32))
        gemv = self.library.qk_gemv_q8 if self.activations == "int8" else self.library.qk_gemv
        self._decode = DecodeGemv(gemv, self._weight, (), self.columns, False)

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1] * 8 // self.bits

    @property
    def decode(self) -> str:
        return f"{self.activations}-tiled" if self._decode.tiled else self.activations

    def run_gemv(self, x: torch.Tensor, y: torch.Tensor) -> int:
        return self._decode.run(x, y)

    def run_dequant(self, begin: int, end: int, out: torch.Tensor) -> int:
        return self.library.qk_dequant_rows(self._weight, begin, end, out.data_ptr(),
                                            int(out.dtype == torch.bfloat16), torch.get_num_threads())


# E2M1 code -> 2 * value + 12: FP4 as unsigned integer codes in [0, 24] with zero point 12.
_E2M1_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12)
FP4_INT_CODES = torch.tensor([12 + m for m in _E2M1_DOUBLED] + [12 - m for m in _E2M1_DOUBLED], dtype=torch.uint8)
FP4_INT_ZERO = 12


@dataclass(repr=False)
class CpuFp4Kernel(CpuGemm):
    """E2M1 weights: ``packed`` uint8 ``[n, k/2]`` (quantkit's native packing, read in the order of
    :func:`block_order`), block ``scales`` ``[n, k/scale_block]`` as float16 or as bytes of ``scale_format``
    (``e8m0``, ``e4m3``) decoded by ``lut`` (their 256 float32 values), divided by ``global_scale`` when given.
    ``k`` a multiple of 32, ``scale_block`` 16 or a multiple of 32. With ``activations="int8"`` decode runs the
    integer kernels on codes ``2 * value + 12`` (zero point 12, scales halved), from a 16-row tiled copy on
    builds that have one, else from the rows (natural order, copied, for blocks of 16)."""

    packed: torch.Tensor
    scales: torch.Tensor
    lut: torch.Tensor | None
    global_scale: float | None
    scale_block: int
    scale_format: str = "fp16"
    activations: str = "float"
    _int8: DecodeGemv | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.in_features % BLOCK or not fp4_block_fits(self.scale_block):
            raise ValueError("in_features must be a multiple of 32 and the scale block 16 or a multiple of 32")
        byte_scales = self.scale_format != "fp16"
        if (self.lut is not None) != byte_scales or (self.scales.dtype == torch.float16) == byte_scales:
            raise ValueError("float16 scales take no table; byte scales need one")
        self.packed, self.scales = self.packed.contiguous(), self.scales.contiguous()
        if self.activations == "int8":
            self._int8 = self._int8_decode()

    def _int8_decode(self) -> DecodeGemv:
        """The int8 decode GEMV of these weights as integer codes through :data:`FP4_INT_CODES`."""
        natural = unpack_nibbles(self.packed, self.in_features)
        tiled = bool(self.library.qk_tile_rows(4))
        if tiled:
            gemv, codes, scales, columns = self.library.qk_gemv_q8_tiled, tile_codes(natural, 4), tile_rows(self.scales), None
        elif self.scale_block == 16:  # the row kernels' groups of 16 are positions 0-15 and 16-31 of a block
            gemv, codes, scales, columns = self.library.qk_gemv_q8, pack_positions(natural), self.scales, None
        else:
            gemv, codes, scales, columns = self.library.qk_gemv_q8, self.packed, self.scales, self.columns
        weight = QkWeight(codes.data_ptr(), scales.data_ptr(), None, self.out_features, self.in_features,
                          self.scale_block, 4, int(self.scale_format == "fp16"), 0, SCALE_FORMATS.get(self.scale_format, 0),
                          FP4_INT_CODES.data_ptr(), FP4_INT_ZERO, 2.0 * (self.global_scale or 1.0))
        return DecodeGemv(gemv, weight, (codes, scales), columns, tiled)

    @property
    def decode(self) -> str:
        if self._int8 is None:
            return "float"
        return "int8-tiled" if self._int8.tiled else "int8"

    @property
    def gemv_columns(self) -> torch.Tensor | None:
        return self.columns if self._int8 is None else self._int8.columns

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
        if self._int8 is not None:
            return self._int8.run(x, y)
        return self.library.qk_fp4_gemv(
            x.data_ptr(), x.shape[0], self.in_features, self.packed.data_ptr(), *self._scale_args(),
            self.out_features, self.scale_block, y.data_ptr(), torch.get_num_threads(),
        )

    def run_dequant(self, begin: int, end: int, out: torch.Tensor) -> int:
        return self.library.qk_fp4_dequant_rows(
            self.packed.data_ptr(), *self._scale_args(), self.in_features, self.scale_block, begin, end,
            out.data_ptr(), int(out.dtype == torch.bfloat16), torch.get_num_threads(),
        )


def fp4_block_fits(scale_block: int) -> bool:
    """Whether the FP4 C kernels handle blocks of ``scale_block`` columns."""
    return scale_block == 16 or (scale_block > 0 and scale_block % BLOCK == 0)


def csr_add(library: ctypes.CDLL, offsets: torch.Tensor, columns: torch.Tensor, deltas: torch.Tensor,
            x: torch.Tensor, y: torch.Tensor) -> None:
    """``y [m, n] += x [m, k] @ D.T`` in place (float32, contiguous) for ``D`` in CSR: int32 ``offsets [n + 1]``,
    unsigned 16-bit ``columns`` (stored as int16) and float32 ``deltas``."""
    _check(library.qk_csr_add(offsets.data_ptr(), columns.data_ptr(), deltas.data_ptr(), y.shape[1], x.data_ptr(),
                              x.shape[0], x.shape[1], y.data_ptr(), torch.get_num_threads()))


def _check(status: int) -> None:
    if status != 0:
        raise RuntimeError(f"quantkit CPU kernel failed with status {status}")


def fuse_tiles(kernels: list[object]) -> DecodeGemv | None:
    """One int8 decode for kernels that share an input (q/k/v, gate/up): their tiles stacked along the output
    rows, each kernel then serving from views of the stack, so no code is held twice. None unless every kernel
    has tiles and all have the same input size, input order, group geometry, code width and statistic dtypes,
    and every kernel but the last whole tiles of rows."""
    if not all(isinstance(k, CpuIntKernel) and k.tiles is not None for k in kernels):
        return None
    first = kernels[0]

    def geometry(k: CpuIntKernel) -> tuple:
        return (k.in_features, k.group_size, k.bits, k.scales.dtype, k.zeros.dtype, k.library)

    same_columns = all(_same_order(k.gemv_columns, first.gemv_columns) for k in kernels)
    whole_tiles = all(k.out_features % TILE_ROWS == 0 for k in kernels[:-1])
    if not (same_columns and whole_tiles and all(geometry(k) == geometry(first) for k in kernels)):
        return None
    stack = tuple(parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*(k.tiles.tensors for k in kernels)))
    tile = 0
    for kernel in kernels:
        tiles = -(-kernel.out_features // TILE_ROWS)
        kernel.use_tiles(tuple(t[tile:tile + tiles] for t in stack), first.gemv_columns)
        tile += tiles
    return first.tiled_decode(stack, sum(k.out_features for k in kernels), first.gemv_columns)


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    """Whether two input orders (``None``: the natural one) are the same."""
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
