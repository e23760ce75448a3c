"""E2M1 (FP4) weights with block scales: the ``fp4``, ``mxfp4`` and ``nvfp4`` number formats.

Stored tensors, per layer ``[out, in]`` with ``G = ceil(in / block)`` blocks per row (the same names, dtypes
and layout as compressed-tensors' ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``):

- ``weight_packed`` uint8 ``[out, ceil(in/2)]``: two E2M1 codes per byte, the even column in the low nibble;
- ``weight_scale`` ``[out, G]``: float16 (``fp4``), uint8 E8M0 exponents (``mxfp4``) or float8_e4m3fn (``nvfp4``);
- ``weight_global_scale`` float32 ``[1]`` (``nvfp4`` only), a divisor of every block scale.

``W[n, k] = e2m1(code[n, k]) * scale[n, k // block] (/ global_scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorSpec
from quantkit.formats.e2m1 import SCALE_CODECS, TENSOR_SCALED, e2m1_decode
from quantkit.formats.packing import pack_nibbles, unpack_nibbles
from quantkit.schemes import FLOAT_FORMATS, QuantScheme


@dataclass
class FloatQuantizedTensor(QuantizedTensor):
    """Codes ``[out, in]`` (uint8, E2M1 with the sign in bit 3), stored block scales ``[out, G]`` and, for NVFP4,
    the float32 global scale ``[1]``."""

    kind = "e2m1"
    roles = {"weight_packed": "codes", "weight_scale": "statistics", "weight_global_scale": "statistics"}

    codes: torch.Tensor
    scales: torch.Tensor
    scheme: QuantScheme
    global_scale: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def block(self) -> int:
        """Columns per scale."""
        return self.scheme.group_columns(self.codes.shape[1])

    def block_scales(self) -> torch.Tensor:
        """The float32 scale of every block ``[out, G]``, as the quantizer used it."""
        scales = SCALE_CODECS[self.scheme.format].decode(self.scales)
        return scales if self.global_scale is None else scales / self.global_scale

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.shape
        scales = self.block_scales().repeat_interleave(self.block, dim=1)[:, :in_features]
        return (e2m1_decode(self.codes) * scales).to(dtype)

    def meta(self) -> dict:
        return {"kind": self.kind, **self.scheme.to_dict()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"weight_packed": pack_nibbles(self.codes), "weight_scale": self.scales.contiguous()}
        if self.global_scale is not None:
            tensors["weight_global_scale"] = self.global_scale.reshape(1).float()
        return tensors

    @classmethod
    def expected_tensors(cls, meta: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        scheme = _scheme(meta)
        out_features, in_features = shape
        specs: dict[str, TensorSpec] = {
            "weight_packed": ((out_features, -(-in_features // 2)), torch.uint8),
            "weight_scale": ((out_features, scheme.num_groups(in_features)), SCALE_CODECS[scheme.format].dtype),
        }
        if scheme.format in TENSOR_SCALED:
            specs["weight_global_scale"] = ((1,), torch.float32)
        return specs

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> FloatQuantizedTensor:
        scheme = _scheme(meta)
        SCALE_CODECS[scheme.format].check(tensors["weight_scale"], "weight_scale")
        global_scale = tensors.get("weight_global_scale")
        if global_scale is not None and not (torch.isfinite(global_scale).all() and (global_scale > 0).all()):
            raise QuantkitError(f"weight_global_scale must be a positive finite number, got {global_scale.tolist()}")
        return cls(unpack_nibbles(tensors["weight_packed"], shape[1]), tensors["weight_scale"], scheme, global_scale)


def _scheme(meta: dict) -> QuantScheme:
    fmt = field(meta, "format", str)
    if fmt not in FLOAT_FORMATS:
        raise QuantkitError(f"an e2m1 layer needs a float number format ({', '.join(FLOAT_FORMATS)}), got {fmt!r}")
    return QuantScheme(bits=field(meta, "bits", int, 4), group_size=field(meta, "group_size", int),
                       symmetric=field(meta, "symmetric", bool, True), format=fmt)
