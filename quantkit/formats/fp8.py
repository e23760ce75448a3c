"""FP8 (E4M3) weights: the ``fp8`` number format.

E4M3 (OCP 8-bit float, torch's ``float8_e4m3fn``): 1 sign, 4 exponent (bias 7) and 3 mantissa bits, no
infinities; the largest magnitude is 448. Values are scaled into that range by one float32 scale per group of
columns (``amax / 448``; per output channel with ``group_size -1``), shared by ``block_rows`` output rows
(1: each row its own; 128 with group 128: 128x128 blocks; -1: every row, so one scale per tensor with group
-1), and rounded to the nearest E4M3 value (ties to even, as torch's cast does), saturating at ±448.

Stored tensors, per layer ``[out, in]`` with ``G`` groups per row and ``R`` blocks of rows: ``weight_fp8``
float8_e4m3fn ``[out, in]`` and ``weight_scale`` float32 ``[R, G]``.
``W[n, k] = fp8[n, k] * scale[n // block_rows, k // group]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorSpec
from quantkit.schemes import FP8_FORMAT, QuantScheme

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest E4M3 value (ties to even), saturating at ±448, as float8_e4m3fn."""
    return x.float().clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


@dataclass
class FP8QuantizedTensor(QuantizedTensor):
    """E4M3 values ``[out, in]`` and float32 scales ``[R, G]`` (one row per block of output rows)."""

    kind = "fp8"
    roles = {"weight_fp8": "codes", "weight_scale": "statistics"}

    values: torch.Tensor
    scales: torch.Tensor
    scheme: QuantScheme

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)  # type: ignore[return-value]

    def column_scales(self) -> torch.Tensor:
        """The scale of every element ``[out, in]``."""
        out_features, in_features = self.shape
        columns = self.scales.repeat_interleave(self.scheme.group_columns(in_features), dim=1)[:, :in_features]
        return columns.repeat_interleave(self.scheme.row_block(out_features), dim=0)[:out_features]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.values.float() * self.column_scales()).to(dtype)

    def meta(self) -> dict:
        return {"kind": self.kind, **self.scheme.to_dict()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight_fp8": self.values.contiguous(), "weight_scale": self.scales.float().contiguous()}

    @classmethod
    def expected_tensors(cls, meta: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        scheme = _scheme(meta)
        out_features, in_features = shape
        return {"weight_fp8": ((out_features, in_features), FP8_DTYPE),
                "weight_scale": ((scheme.num_row_blocks(out_features), scheme.num_groups(in_features)), torch.float32)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> FP8QuantizedTensor:
        scales = tensors["weight_scale"]
        if not (torch.isfinite(scales).all() and (scales > 0).all()):
            raise QuantkitError("weight_scale of an fp8 layer must hold positive finite numbers")
        if torch.isnan(tensors["weight_fp8"].float()).any():
            raise QuantkitError("weight_fp8 holds NaN codes")
        return cls(tensors["weight_fp8"], scales.float(), _scheme(meta))


def _scheme(meta: dict) -> QuantScheme:
    fmt = field(meta, "format", str)
    if fmt != FP8_FORMAT:
        raise QuantkitError(f"an fp8 layer needs the {FP8_FORMAT} number format, got {fmt!r}")
    return QuantScheme(bits=field(meta, "bits", int, 8), group_size=field(meta, "group_size", int), symmetric=True,
                       format=fmt, block_rows=field(meta, "block_rows", int, 1))
