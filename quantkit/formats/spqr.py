"""SpQR weights: small-group integer codes whose statistics are quantized again, plus fp16 outliers in CSR.

A layer ``W [out, in]`` is stored as
- ``qweight``: ``bits``-bit codes, one row per output, columns in the quantization order (``perm``);
- first-level statistics, one scale (and, asymmetric, one zero point) per output row and group of
  ``group_size`` columns, both real numbers, each quantized to ``stat_bits``-bit codes on an asymmetric grid
  shared by ``stat_group_size`` consecutive rows of the same column group (the second level), whose own scale
  and zero are float16;
- outliers, kept at their float16 value, in CSR over the original columns: ``outlier_row_offsets`` int32
  ``[out + 1]``, ``outlier_columns`` and ``outlier_values`` ``[nnz]``.
Column indices and the permutation are 16-bit, read as unsigned, so layers up to 65536 inputs are stored.

Dense part: ``s * (code - z)`` with ``s = max(ss * (cs - sz), MIN_SCALE)`` and ``z = zs * (cz - zz)`` (or the
middle code when symmetric), all in float32; outlier positions take the outlier value instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorPlan, TensorSpec
from quantkit.formats.grid import MIN_SCALE
from quantkit.formats.packing import pack_rows, packed_width, unpack_rows
from quantkit.schemes import QuantScheme

STAT_DTYPE = torch.float16
MAX_COLUMNS = 2**16  # column indices and the permutation are stored in 16 bits
# A block of statistics whose spread is this small against its magnitude is stored as a constant.
_FLAT_RATIO = 2.0**12


@dataclass
class StatCodes:
    """Second-level quantized statistics of ``[groups, rows]``: codes plus float16 scale/zero per row block."""

    codes: torch.Tensor  # uint8 [groups, rows]
    scale: torch.Tensor  # float16 [groups, row_blocks]
    zero: torch.Tensor  # float16 [groups, row_blocks]

    def dequantize(self, block: int) -> torch.Tensor:
        """The statistics as float32 ``[groups, rows]``: ``scale * (code - zero)`` of each row's block."""
        rows = self.codes.shape[1]
        return _per_row(self.scale, block, rows) * (self.codes.float() - _per_row(self.zero, block, rows))

    def rows(self, begin: int, end: int, block: int) -> StatCodes:
        """The statistics of rows ``[begin, end)``; ``begin`` is a multiple of ``block``."""
        blocks = slice(begin // block, -(-end // block))
        return StatCodes(self.codes[:, begin:end], self.scale[:, blocks], self.zero[:, blocks])


def _per_row(stat: torch.Tensor, block: int, rows: int) -> torch.Tensor:
    """A per-block statistic ``[groups, blocks]`` repeated for each of ``rows`` rows, in float32."""
    return stat.float().repeat_interleave(block, dim=1)[:, :rows]


def first_level_statistics(
    scale_stats: StatCodes, zero_stats: StatCodes | None, bits: int, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized first-level scales (at least ``MIN_SCALE``) and zero points ``[groups, rows]``, float32.

    Without zero statistics (symmetric) every zero point is the middle code ``2**(bits-1)``.
    """
    scales = scale_stats.dequantize(block).clamp_min(MIN_SCALE)
    if zero_stats is None:
        return scales, torch.full_like(scales, float(2 ** (bits - 1)))
    return scales, zero_stats.dequantize(block)


def quantize_stats(values: torch.Tensor, bits: int, block: int) -> StatCodes:
    """Quantize ``values [groups, rows]`` with an asymmetric min-max grid per block of ``block`` rows.

    The grid's scale and (real-valued) zero are rounded to float16 before any code is chosen, so the stored
    statistics reproduce exactly what the quantizer used. A block whose values are (nearly) all equal gets
    scale 1 and zero ``-min``: every code is 0 and the block decodes to its minimum.
    """
    groups, rows = values.shape
    blocks = -(-rows // block)
    padded = torch.cat([values, values[:, -1:].expand(groups, blocks * block - rows)], dim=1)
    padded = padded.float().view(groups, blocks, block)
    low, high = padded.amin(dim=2), padded.amax(dim=2)
    maxq = 2**bits - 1
    width = high - low
    flat = width * _FLAT_RATIO <= low.abs() * maxq
    scale = torch.where(flat, 1.0, width / maxq).clamp_min(MIN_SCALE).to(STAT_DTYPE)
    zero = torch.where(flat, -low, -low / scale.float()).to(STAT_DTYPE)
    codes = torch.round(values.float() / _per_row(scale, block, rows) + _per_row(zero, block, rows))
    codes = torch.clamp(codes, 0, maxq).to(torch.uint8)
    return StatCodes(codes, scale, zero)


def first_level_grid(
    low: torch.Tensor, high: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and real-valued zero of a min-max grid over ``[low, high]`` (any shape), in float32.

    Asymmetric grids span exactly the range (0 need not be on the grid); symmetric ones are
    ``[-max|w|, max|w|]`` with the zero at the middle code. Degenerate ranges are widened to include 0.
    """
    maxq = 2**bits - 1
    if symmetric:
        high = torch.maximum(low.abs(), high.abs())
        low = -high
    same = high == low
    low = torch.where(same, torch.clamp(low, max=0), low)
    high = torch.where(same, torch.clamp(high, min=0), high)
    high = torch.where(high == low, low + 1, high)
    scale = (high - low) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if symmetric else -low / scale
    return scale, zero


def dense_weight(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, size: int) -> torch.Tensor:
    """``scale * (code - zero)`` in float32 for codes ``[rows, cols]`` and statistics ``[groups, rows]``, with
    ``size`` columns per group."""
    rows, cols = codes.shape
    if cols % size == 0:
        q = codes.float().view(rows, -1, size)
        return (scales.t()[:, :, None] * (q - zeros.t()[:, :, None])).reshape(rows, cols)
    group = torch.arange(cols, device=codes.device) // size
    return scales.t()[:, group] * (codes.float() - zeros.t()[:, group])


@dataclass
class CsrOutliers:
    """Outliers of an ``[rows, cols]`` matrix in CSR: sorted columns within each row, float16 values."""

    row_offsets: torch.Tensor  # int32 [rows + 1]
    columns: torch.Tensor  # int64 [nnz]
    values: torch.Tensor  # float16 [nnz]

    @classmethod
    def from_mask(cls, mask: torch.Tensor, weight: torch.Tensor) -> CsrOutliers:
        """The entries of ``weight`` where ``mask`` is set (row-major order), values as float16."""
        rows, cols = mask.nonzero(as_tuple=True)
        counts = torch.bincount(rows, minlength=mask.shape[0])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=mask.device), counts.cumsum(0)]).to(torch.int32)
        return cls(offsets, cols, weight[rows, cols].to(torch.float16))

    @property
    def count(self) -> int:
        return int(self.values.numel())

    def rows(self) -> torch.Tensor:
        """The row of every stored entry."""
        counts = (self.row_offsets[1:] - self.row_offsets[:-1]).long()
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def validate(self, shape: tuple[int, int]) -> None:
        """Refuse offsets, columns or values that do not describe a proper sparse ``shape`` matrix."""
        offsets = self.row_offsets.long()
        if int(offsets[0]) != 0 or int(offsets[-1]) != self.count or bool((offsets[1:] < offsets[:-1]).any()):
            raise QuantkitError("outlier row offsets are not a non-decreasing run from 0 to the outlier count")
        if self.count:
            if int(self.columns.min()) < 0 or int(self.columns.max()) >= shape[1]:
                raise QuantkitError(f"outlier column index outside [0, {shape[1]})")
            rows = self.rows()
            same_row = rows[1:] == rows[:-1]
            if bool((same_row & (self.columns[1:] <= self.columns[:-1])).any()):
                raise QuantkitError("outlier columns are not strictly increasing within a row")
            if not bool(torch.isfinite(self.values).all()):
                raise QuantkitError("outlier values contain NaN or infinity")


def _to_u16(indices: torch.Tensor) -> torch.Tensor:
    """Indices in ``[0, 65536)`` stored as int16 (two's complement of the unsigned value)."""
    return indices.to(torch.int32).to(torch.int16)


def _from_u16(stored: torch.Tensor) -> torch.Tensor:
    return stored.to(torch.int64) & 0xFFFF


@dataclass
class SpQRQuantizedTensor(QuantizedTensor):
    """An SpQR layer; ``codes [out, in]`` are in quantization order: position ``i`` is column ``perm[i]``."""

    kind = "spqr"
    roles = {"qweight": "codes", "perm": "permutation",
             **{f"{stat}_{part}": "statistics" for stat in ("scale", "zero") for part in ("codes", "scale", "zero")},
             **{f"outlier_{part}": "outliers" for part in ("row_offsets", "columns", "values")}}

    codes: torch.Tensor
    scale_stats: StatCodes
    zero_stats: StatCodes | None  # None when symmetric
    outliers: CsrOutliers
    scheme: QuantScheme
    stat_bits: int
    stat_group_size: int
    perm: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First-level scales and zero points ``[groups, out]`` in float32."""
        return first_level_statistics(self.scale_stats, self.zero_stats, self.scheme.bits, self.stat_group_size)

    def dense_permuted(self) -> torch.Tensor:
        """The dense part (outliers not applied) in quantization column order, float32."""
        return dense_weight(self.codes, *self.statistics(), self.scheme.group_columns(self.shape[1]))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.dense_permuted()
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        if self.outliers.count:
            w[self.outliers.rows(), self.outliers.columns] = self.outliers.values.float()
        return w.to(dtype)

    @classmethod
    def planned_meta(cls, plan: TensorPlan, shape: tuple[int, int]) -> dict:
        return {**super().planned_meta(plan, shape), "outliers": 0}  # the outliers are counted from the data

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            **self.scheme.to_dict(),
            "stat_bits": self.stat_bits,
            "stat_group_size": self.stat_group_size,
            "permuted": self.perm is not None,
            "outliers": self.outliers.count,
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "qweight": pack_rows(self.codes, self.scheme.bits),
            **_stat_tensors("scale", self.scale_stats, self.stat_bits),
        }
        if self.zero_stats is not None:
            tensors.update(_stat_tensors("zero", self.zero_stats, self.stat_bits))
        if self.perm is not None:
            tensors["perm"] = _to_u16(self.perm)
        tensors["outlier_row_offsets"] = self.outliers.row_offsets.to(torch.int32)
        tensors["outlier_columns"] = _to_u16(self.outliers.columns)
        tensors["outlier_values"] = self.outliers.values.to(torch.float16)
        return tensors

    @classmethod
    def expected_tensors(cls, meta: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        scheme, stat_bits, stat_block, nnz = _parse_meta(meta, shape)
        out_features, in_features = shape
        groups = scheme.num_groups(in_features)
        blocks = -(-out_features // stat_block)
        stat_specs = {
            "codes": ((groups, packed_width(out_features, stat_bits)), torch.int32),
            "scale": ((groups, blocks), STAT_DTYPE),
            "zero": ((groups, blocks), STAT_DTYPE),
        }
        specs: dict[str, TensorSpec] = {"qweight": ((out_features, packed_width(in_features, scheme.bits)), torch.int32)}
        for stat in ("scale",) if scheme.symmetric else ("scale", "zero"):
            specs.update({f"{stat}_{part}": spec for part, spec in stat_specs.items()})
        if field(meta, "permuted", bool, False):
            specs["perm"] = ((in_features,), torch.int16)
        specs["outlier_row_offsets"] = ((out_features + 1,), torch.int32)
        specs["outlier_columns"] = ((nnz,), torch.int16)
        specs["outlier_values"] = ((nnz,), torch.float16)
        return specs

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> SpQRQuantizedTensor:
        scheme, stat_bits, stat_block, _ = _parse_meta(meta, shape)
        out_features, in_features = shape
        perm = None
        if "perm" in tensors:
            perm = _from_u16(tensors["perm"])
            if not torch.equal(torch.sort(perm).values, torch.arange(in_features, device=perm.device)):
                raise QuantkitError("SpQR permutation is not a permutation of the input columns")
        outliers = CsrOutliers(tensors["outlier_row_offsets"], _from_u16(tensors["outlier_columns"]),
                               tensors["outlier_values"])
        outliers.validate(shape)

        def stats(name: str) -> StatCodes | None:
            if f"{name}_codes" not in tensors:
                return None
            scale, zero = tensors[f"{name}_scale"], tensors[f"{name}_zero"]
            if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
                raise QuantkitError(f"SpQR {name} statistics contain NaN or infinity")
            return StatCodes(unpack_rows(tensors[f"{name}_codes"], stat_bits, out_features), scale, zero)

        return cls(
            codes=unpack_rows(tensors["qweight"], scheme.bits, in_features),
            scale_stats=stats("scale"),  # type: ignore[arg-type]
            zero_stats=stats("zero"),
            outliers=outliers,
            scheme=scheme,
            stat_bits=stat_bits,
            stat_group_size=stat_block,
            perm=perm,
        )


def _stat_tensors(name: str, stats: StatCodes, bits: int) -> dict[str, torch.Tensor]:
    return {
        f"{name}_codes": pack_rows(stats.codes, bits),
        f"{name}_scale": stats.scale.to(STAT_DTYPE).contiguous(),
        f"{name}_zero": stats.zero.to(STAT_DTYPE).contiguous(),
    }


def check_stat_options(stat_bits: int, stat_group_size: int) -> None:
    """Refuse second-level statistics that cannot be stored."""
    if not 1 <= stat_bits <= 8:
        raise QuantkitError(f"SpQR statistic bits must be between 1 and 8, got {stat_bits}")
    if stat_group_size < 1:
        raise QuantkitError(f"SpQR statistic group size must be a positive number of rows, got {stat_group_size}")


def _parse_meta(meta: dict, shape: tuple[int, int]) -> tuple[QuantScheme, int, int, int]:
    scheme = QuantScheme(bits=field(meta, "bits", int), group_size=field(meta, "group_size", int),
                         symmetric=field(meta, "symmetric", bool), format=field(meta, "format", str, "int"))
    stat_bits, stat_block = field(meta, "stat_bits", int), field(meta, "stat_group_size", int)
    nnz = field(meta, "outliers", int)
    check_stat_options(stat_bits, stat_block)
    if shape[1] > MAX_COLUMNS:
        raise QuantkitError(f"SpQR layers hold at most {MAX_COLUMNS} input columns, got {shape[1]}")
    if not 0 <= nnz <= shape[0] * shape[1]:
        raise QuantkitError(f"SpQR outlier count {nnz} does not fit a {shape[0]}x{shape[1]} layer")
    return scheme, stat_bits, stat_block, nnz
