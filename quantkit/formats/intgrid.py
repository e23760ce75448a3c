"""Integer weights on a uniform grid with per-group scales and zero points (GPTQ/RTN output)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorPlan, TensorSpec
from quantkit.formats.packing import pack_rows, packed_width, unpack_rows
from quantkit.schemes import QuantScheme

SCALE_DTYPE = torch.float16  # the scales integer grids fit and store

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name (``float16``) under which a dtype is recorded in JSON."""
    return str(dtype).removeprefix("torch.")


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``scale * (code - zero)`` with scales and zeros broadcast to the codes' shape, in float32."""
    return scales.float() * (codes.float() - zeros.float())


@dataclass
class IntQuantizedTensor(QuantizedTensor):
    """Codes ``[out, in]`` in ``[0, 2**bits)``; ``scales``/``zeros`` are ``[out, groups]``.

    Column ``j`` belongs to group ``g_idx[j]`` when act-order reordered the groups, else ``j // group_size``.
    """

    kind = "int"
    roles = {"qweight": "codes", "scales": "statistics", "qzeros": "statistics", "g_idx": "permutation"}

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    scheme: QuantScheme
    g_idx: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def group_index(self) -> torch.Tensor:
        """The group of every input column."""
        if self.g_idx is not None:
            return self.g_idx.long()
        in_features = self.codes.shape[1]
        size = self.scheme.group_columns(in_features)
        return torch.arange(in_features, device=self.codes.device) // size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.shape
        size = self.scheme.group_columns(in_features)
        if self.g_idx is None and in_features % size == 0:
            # Sequential full groups: broadcast each group's statistics instead of gathering per column.
            codes = self.codes.reshape(out_features, -1, size)
            w = dequantize_codes(codes, self.scales[:, :, None], self.zeros[:, :, None])
            return w.reshape(out_features, in_features).to(dtype)
        g = self.group_index()
        return dequantize_codes(self.codes, self.scales[:, g], self.zeros[:, g]).to(dtype)

    @classmethod
    def planned_meta(cls, plan: TensorPlan, shape: tuple[int, int]) -> dict:
        act_order = plan.column_groups and plan.scheme.group_size < shape[1]  # one group needs no g_idx
        return {"kind": cls.kind, **plan.scheme.to_dict(), "act_order": act_order, "scale_dtype": dtype_name(SCALE_DTYPE)}

    def meta(self) -> dict:
        return {
            "kind": self.kind,
            **self.scheme.to_dict(),
            "act_order": self.g_idx is not None,
            "scale_dtype": dtype_name(self.scales.dtype),
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        bits = self.scheme.bits
        tensors = {
            "qweight": pack_rows(self.codes, bits),
            "scales": self.scales.contiguous(),
            "qzeros": pack_rows(self.zeros, bits),
        }
        if self.g_idx is not None:
            tensors["g_idx"] = self.g_idx.to(torch.int32).contiguous()
        return tensors

    @classmethod
    def expected_tensors(cls, meta: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        scheme, scale_dtype = _parse_meta(meta)
        out_features, in_features = shape
        groups = scheme.num_groups(in_features)
        specs: dict[str, TensorSpec] = {
            "qweight": ((out_features, packed_width(in_features, scheme.bits)), torch.int32),
            "scales": ((out_features, groups), scale_dtype),
            "qzeros": ((out_features, packed_width(groups, scheme.bits)), torch.int32),
        }
        if field(meta, "act_order", bool, False):
            specs["g_idx"] = ((in_features,), torch.int32)
        return specs

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> IntQuantizedTensor:
        scheme, _ = _parse_meta(meta)
        out_features, in_features = shape
        groups = scheme.num_groups(in_features)
        g_idx = tensors.get("g_idx")
        if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise QuantkitError(f"g_idx refers to groups outside [0, {groups})")
        return cls(
            codes=unpack_rows(tensors["qweight"], scheme.bits, in_features),
            scales=tensors["scales"],
            zeros=unpack_rows(tensors["qzeros"], scheme.bits, groups),
            scheme=scheme,
            g_idx=g_idx,
        )


def _parse_meta(meta: dict) -> tuple[QuantScheme, torch.dtype]:
    fmt = field(meta, "format", str, "int")
    if fmt != "int":
        raise QuantkitError(f"an int layer cannot hold number format {fmt!r}")
    scheme = QuantScheme(bits=field(meta, "bits", int), group_size=field(meta, "group_size", int),
                         symmetric=field(meta, "symmetric", bool), format=fmt)
    name = field(meta, "scale_dtype", str, "float16")
    if name not in _DTYPES:
        raise QuantkitError(f"unsupported scale dtype {name!r}; expected one of {', '.join(_DTYPES)}")
    return scheme, _DTYPES[name]
