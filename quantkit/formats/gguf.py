"""GGUF's block formats as number formats: llama.cpp's ``q8_0``, ``q5_0``, ``q4_0`` and the K-quant ``q4_k``.

Every format cuts a row into blocks of 32 input columns. The legacy ones store one float16 scale ``d`` per
block and unsigned codes ``q`` in ``[0, 2**bits)`` standing for ``(q - 2**(bits-1)) * d``. llama.cpp fits
``d = max|w| / 127`` for ``q8_0`` and, for ``q5_0``/``q4_0``, ``d = -w_e / 2**(bits-1)`` with ``w_e`` the block's
value of largest magnitude, which therefore lands exactly on code 0 (``d`` may be negative).

``q4_k`` groups 8 blocks into a super-block of 256 columns with float16 ``d`` and ``dmin``; each block has a
6-bit scale ``sc`` and min ``m``, and a code ``q`` in ``[0, 16)`` stands for ``q * (d * sc) - dmin * m`` (float32
products, as llama.cpp computes them). The super-block scales are fitted from the tensor before any code is
chosen (:func:`make_grid` sees the whole weight), so a GPTQ sweep that fits each block when it reaches it
rounds onto exactly the grid that is stored.

Stored tensors per layer ``[out, in]`` (quantkit's native layout; the GGUF layout packs the same numbers
into llama.cpp's block structs): ``qweight`` int32 (codes packed row by row, :mod:`quantkit.formats.packing`),
``d`` float16 ``[out, in/32]`` (``q4_k``: ``[out, in/256]``), and for ``q4_k`` also ``dmin`` float16
``[out, in/256]``, ``sc`` and ``m`` uint8 ``[out, in/32]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.config_fields import field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorSpec
from quantkit.formats.grid import Grid, Params
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.packing import pack_rows, packed_width, unpack_rows
from quantkit.schemes import GGUF_FORMATS, K_SUPER_BLOCK, QuantScheme

K_SCALE_MAX = 63  # the largest 6-bit sub-block scale or min of q4_k
_K_BLOCKS = K_SUPER_BLOCK // 32  # blocks per super-block
_SEARCH_FACTORS = torch.linspace(0.7, 1.0, 16).tolist()  # --mse: the legacy scale times each factor
_K_STEPS = (-1, 0, 1, 2)  # q4_k: the 6-bit scale and min around their rounded values, the best pair kept


def is_k_quant(scheme: QuantScheme) -> bool:
    """Whether the format has super-blocks (``q4_k``)."""
    return scheme.format == "q4_k"


def _half(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16 (as stored), back in float32."""
    return x.to(torch.float16).float()


def _safe_div(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.zeros_like(x), x / torch.where(scale == 0, torch.ones_like(scale), scale))


@dataclass
class GGUFQuantizedTensor(QuantizedTensor):
    """Codes ``[out, in]``; ``d`` per block (legacy) or per super-block (``q4_k``, with ``dmin``, ``sc``, ``m``)."""

    kind = "gguf"
    roles = {"qweight": "codes", "d": "statistics", "dmin": "statistics", "sc": "statistics", "m": "statistics"}

    codes: torch.Tensor
    d: torch.Tensor
    scheme: QuantScheme
    dmin: torch.Tensor | None = None
    sc: torch.Tensor | None = None
    m: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def block_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, offset)`` of every block ``[out, in/32]`` in float32: a code stands for ``q * scale - offset``."""
        if is_k_quant(self.scheme):
            d = self.d.float().repeat_interleave(_K_BLOCKS, dim=1)
            dmin = self.dmin.float().repeat_interleave(_K_BLOCKS, dim=1)
            return d * self.sc.float(), dmin * self.m.float()
        d = self.d.float()
        return d, d * 2 ** (self.scheme.bits - 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out_features, in_features = self.shape
        scale, offset = self.block_scales()
        blocks = self.codes.reshape(out_features, -1, self.scheme.group_size).float()
        return (blocks * scale[..., None] - offset[..., None]).reshape(out_features, in_features).to(dtype)

    def meta(self) -> dict:
        return {"kind": self.kind, **self.scheme.to_dict()}

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"qweight": pack_rows(self.codes, self.scheme.bits), "d": self.d.contiguous()}
        if is_k_quant(self.scheme):
            tensors.update(dmin=self.dmin.contiguous(), sc=self.sc.contiguous(), m=self.m.contiguous())
        return tensors

    @classmethod
    def expected_tensors(cls, meta: dict, shape: tuple[int, int]) -> dict[str, TensorSpec]:
        scheme = _parse_meta(meta)
        out_features, in_features = shape
        scheme.check_fits("the layer", in_features)
        blocks = in_features // scheme.group_size
        specs: dict[str, TensorSpec] = {"qweight": ((out_features, packed_width(in_features, scheme.bits)), torch.int32)}
        if is_k_quant(scheme):
            if in_features % K_SUPER_BLOCK:
                raise QuantkitError(f"q4_k needs rows of a multiple of {K_SUPER_BLOCK} columns, not {in_features}")
            supers = in_features // K_SUPER_BLOCK
            specs.update(d=((out_features, supers), torch.float16), dmin=((out_features, supers), torch.float16),
                         sc=((out_features, blocks), torch.uint8), m=((out_features, blocks), torch.uint8))
        else:
            specs["d"] = ((out_features, blocks), torch.float16)
        return specs

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict, shape: tuple[int, int]) -> GGUFQuantizedTensor:
        scheme = _parse_meta(meta)
        for name in ("sc", "m"):
            if name in tensors and tensors[name].numel() and int(tensors[name].max()) > K_SCALE_MAX:
                raise QuantkitError(f"q4_k {name} holds values above {K_SCALE_MAX} (6 bits)")
        return cls(unpack_rows(tensors["qweight"], scheme.bits, shape[1]), tensors["d"], scheme,
                   tensors.get("dmin"), tensors.get("sc"), tensors.get("m"))


# integer width -> the legacy format that holds a symmetric int grid exactly (same codes, zero point, scales)
_SAME_GRID = {4: "q4_0", 8: "q8_0"}


def exact_gguf_format(scheme: QuantScheme, in_features: int | None = None) -> str | None:
    """The GGUF format that holds ``scheme``'s integer weights exactly, if any: symmetric 4 or 8 bits (zero point
    ``2**(bits-1)``, float16 scales) with groups that are whole blocks of 32 columns; each block takes its group's
    scale. ``in_features`` (when known) must be a whole number of blocks too."""
    if scheme.format != "int" or not scheme.symmetric or scheme.bits not in _SAME_GRID:
        return None
    if scheme.group_size != -1 and scheme.group_size % 32:
        return None
    if in_features is not None and in_features % 32:
        return None
    return _SAME_GRID[scheme.bits]


def from_int(qt: IntQuantizedTensor) -> GGUFQuantizedTensor:
    """An integer tensor in the GGUF format that holds it exactly (see :func:`exact_gguf_format`)."""
    fmt = exact_gguf_format(qt.scheme, qt.shape[1])
    if fmt is None or qt.g_idx is not None or qt.scales.dtype != torch.float16:
        raise QuantkitError(f"{qt.meta()['kind']} w{qt.scheme.bits} g{qt.scheme.group_size} "
                            f"{'sym' if qt.scheme.symmetric else 'asym'}{' act-order' if qt.g_idx is not None else ''} "
                            "has no exact GGUF format (symmetric 4- or 8-bit float16 groups of whole 32-column "
                            "blocks, no g_idx); quantize with --gguf-type")
    blocks_per_group = qt.scheme.group_columns(qt.shape[1]) // 32
    scheme = QuantScheme.for_format(fmt, None, None, None, 32, True)
    return GGUFQuantizedTensor(qt.codes, qt.scales.repeat_interleave(blocks_per_group, dim=1), scheme)


def _parse_meta(meta: dict) -> QuantScheme:
    fmt = field(meta, "format", str)
    if fmt not in GGUF_FORMATS:
        raise QuantkitError(f"a gguf layer cannot hold number format {fmt!r}")
    return QuantScheme(bits=field(meta, "bits", int), group_size=field(meta, "group_size", int),
                       symmetric=field(meta, "symmetric", bool), format=fmt)


class GGUFGrid(Grid):
    """Fitting and rounding onto a GGUF format; ``super_scales`` holds ``q4_k``'s ``(d, dmin)`` ``[rows, in/256]``,
    fitted from the whole weight ``w`` (with the learned clipping ratios applied)."""

    def __init__(self, scheme: QuantScheme, mse: bool, w: torch.Tensor,
                 clip: torch.Tensor | float | None = None) -> None:
        super().__init__(scheme, mse, clip)
        self.zero = 2 ** (scheme.bits - 1)
        self.super_scales = _fit_super_scales(self.clipped(w.float())) if is_k_quant(scheme) else None

    def fit(self, w: torch.Tensor, group: int | None = None) -> Params:
        w = self.clipped(w.float())
        if not is_k_quant(self.scheme):
            return self._fit_legacy(w)
        d, dmin = self.super_scales
        if group is None:
            d, dmin = (t.repeat_interleave(_K_BLOCKS, dim=1) for t in (d, dmin))
        else:
            d, dmin = d[:, group // _K_BLOCKS], dmin[:, group // _K_BLOCKS]
        return self._fit_k(w, d, dmin)

    def _fit_legacy(self, w: torch.Tensor) -> Params:
        if self.scheme.bits == 8:
            d = _half(w.abs().amax(dim=-1) / 127)
        else:
            extreme = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True))[..., 0]
            d = _half(extreme / -self.zero)
        if not self.mse:
            return (d,)
        best, chosen = self._error(w, (d,)), d
        for factor in _SEARCH_FACTORS:
            candidate = _half(d * factor)
            err = self._error(w, (candidate,))
            chosen = torch.where(err < best, candidate, chosen)
            best = torch.minimum(err, best)
        return (chosen,)

    def _fit_k(self, w: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor) -> Params:
        xmin = w.amin(dim=-1).clamp(max=0)
        xmax = w.amax(dim=-1).clamp(min=0)
        sc0 = torch.round(_safe_div((xmax - xmin) / 15, d))
        m0 = torch.round(_safe_div(-xmin, dmin))
        best = chosen = None
        for ds in _K_STEPS:
            for dm in _K_STEPS[:3]:
                sc = (sc0 + ds).clamp(0, K_SCALE_MAX)
                m = (m0 + dm).clamp(0, K_SCALE_MAX)
                params = (d * sc, dmin * m, sc, m, d, dmin)
                err = self._error(w, params)
                if best is None:
                    best, chosen = err, params
                    continue
                better = err < best
                best = torch.where(better, err, best)
                chosen = tuple(torch.where(better, new, old) for new, old in zip(params, chosen))
        return chosen

    def _error(self, w: torch.Tensor, params: Params) -> torch.Tensor:
        return ((self.round(w, params)[1] - w) ** 2).sum(dim=-1)

    def round(self, x: torch.Tensor, params: Params) -> tuple[torch.Tensor, torch.Tensor]:
        maxq = self.scheme.maxq
        if is_k_quant(self.scheme):
            scale, offset = params[0][..., None], params[1][..., None]
            codes = torch.clamp(torch.round(_safe_div(x + offset, scale)), 0, maxq)
            return codes.to(torch.uint8), codes * scale - offset
        d = params[0][..., None]
        codes = torch.clamp(torch.round(_safe_div(x, d)) + self.zero, 0, maxq)
        return codes.to(torch.uint8), (codes - self.zero) * d

    def tensor(self, codes: torch.Tensor, params: Params, g_idx: torch.Tensor | None = None) -> GGUFQuantizedTensor:
        if g_idx is not None:
            raise QuantkitError("GGUF blocks are contiguous along the input: no act-order groups")
        if not is_k_quant(self.scheme):
            return GGUFQuantizedTensor(codes, params[0].to(torch.float16), self.scheme)
        _, _, sc, m, d, dmin = params
        return GGUFQuantizedTensor(codes, d[:, ::_K_BLOCKS].to(torch.float16), self.scheme,
                                   dmin[:, ::_K_BLOCKS].to(torch.float16), sc.to(torch.uint8), m.to(torch.uint8))


def _fit_super_scales(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_k's float16 ``(d, dmin)`` per super-block of ``w [rows, in]``: the largest block scale (range / 15) and
    the largest block min of the super-block, over 63."""
    rows, in_features = w.shape
    if in_features % K_SUPER_BLOCK:
        raise QuantkitError(f"q4_k needs rows of a multiple of {K_SUPER_BLOCK} columns, not {in_features}")
    blocks = w.reshape(rows, in_features // K_SUPER_BLOCK, _K_BLOCKS, -1)
    xmin = blocks.amin(dim=-1).clamp(max=0)
    xmax = blocks.amax(dim=-1).clamp(min=0)
    d = _half((xmax - xmin).amax(dim=-1) / 15 / K_SCALE_MAX)
    dmin = _half((-xmin).amax(dim=-1) / K_SCALE_MAX)
    return d, dmin
