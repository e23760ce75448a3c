"""torch's own weight-only kernels on CPU, fed from quantkit's codes with the layout converted once.

- :class:`AtenInt4Kernel`: ``aten._weight_int4pack_mm_for_cpu`` (tinygemm's CPU port). It computes
  ``w = (q - 8) * s + m`` per group, so quantkit's ``s * (q - z)`` becomes ``m = (8 - z) * s``. Group sizes
  32/64/128/256 that divide ``in_features``, ``out_features`` a multiple of 16; codes of 2 or 3 bits ride along as 4-bit codes.
- :class:`AtenInt8Kernel`: ``aten._weight_int8pack_mm`` with one scale per output row (per-channel). It
  takes signed codes, so ``s * (q - z) = s * (q - 128) + s * (128 - z)``; the second term is a rank-one
  correction ``sum(x) * c`` that vanishes for symmetric weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether torch's int4 kernel accepts a weight of this shape and group size."""
    return group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0


def _gather(x: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2.index_select(1, columns) if columns is not None else x2


@dataclass
class AtenInt4Kernel:
    """``packed``: torch's int4 layout; ``scale_and_zero``: ``[groups, n, 2]`` in the activation dtype."""

    packed: torch.Tensor
    scale_and_zero: torch.Tensor
    group_size: int
    columns: torch.Tensor | None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   dtype: torch.dtype, columns: torch.Tensor | None = None) -> AtenInt4Kernel:
        """Convert codes ``[n, k]`` (groups contiguous, ``k % group_size == 0``) with ``[n, groups]`` statistics."""
        if not int4_fits(*codes.shape, group_size):
            raise ValueError(f"torch's int4 kernel takes group sizes {INT4_GROUP_SIZES} that divide in_features "
                             "and out_features that are multiples of 16")
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
        s = scales.float()
        offset = (8.0 - zeros.float()) * s
        scale_and_zero = torch.stack([s.t(), offset.t()], dim=-1).to(dtype).contiguous()
        return cls(packed, scale_and_zero, group_size, columns)


    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _gather(x, self.columns).to(self.scale_and_zero.dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scale_and_zero)
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)


@dataclass
class AtenInt8Kernel:
    """Signed codes ``[n, k]`` with per-row scales and the asymmetric correction (``None`` when symmetric)."""

    weight: torch.Tensor
    scales: torch.Tensor
    correction: torch.Tensor | None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> AtenInt8Kernel:
        """Convert 8-bit codes ``[n, k]`` with one scale and zero point per row (``[n, 1]``)."""
        if scales.shape[1] != 1:
            raise ValueError("torch's int8 kernel takes one scale per output row (per-channel weights)")
        weight = (codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        s = scales[:, 0].float()
        z = zeros[:, 0].float()
        correction = None if bool((z == 128).all()) else ((128.0 - z) * s).to(dtype)
        return cls(weight, s.to(dtype), correction)


    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _gather(x, None).to(self.scales.dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        if self.correction is not None:
            y = y + x2.sum(dim=1, keepdim=True) * self.correction
        return y.reshape(*x.shape[:-1], -1).to(x.dtype)
