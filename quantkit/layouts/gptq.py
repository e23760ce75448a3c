"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers / vLLM layout), v1 written, v1 and v2 read.

Per quantized linear with ``in`` inputs, ``out`` outputs, ``b`` bits and ``G`` groups:

* ``qweight`` int32 ``[ceil(in*b/32), out]``: codes packed along the input dimension. Each column is one
  little-endian bit stream; for 3 bits this is exactly GPTQ's 10 + split + 10 + split + 10 word scheme.
* ``qzeros`` int32 ``[G, ceil(out*b/32)]``: zero points packed along the output dimension; v1 stores
  ``zero - 1`` (so it cannot hold a zero point of 0), v2 (``checkpoint_format: gptq_v2``) stores ``zero``.
* ``scales`` float16 ``[G, out]`` and ``g_idx`` int32 ``[in]`` (the group of every input column).

Mixed precision uses GPTQModel's ``dynamic`` config: ``{"+:<regex>": {"bits": ..., "group_size": ...}}``
overrides the top-level keys of the modules whose name ``re.match``es the regex (the first matching entry
wins, in order); a ``-:<regex>`` entry marks its modules as not quantized.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantkit import __version__
from quantkit.config_fields import check_type, field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorSpec
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.packing import pack_rows, packed_width, unpack_rows
from quantkit.layouts.base import Encoded, Headers, LayerPlan, Layout, specs_bytes
from quantkit.layouts.common import (
    VLLM_WEIGHT_BITS,
    decoded,
    grid_layers,
    header_dtype,
    int_description,
    lossless_cast,
    sequential_g_idx,
    vllm_moe_refusals,
)
from quantkit.schemes import QuantScheme

FORMAT = "gptq"
V1, V2 = "gptq", "gptq_v2"
CONFIG_FILE = "quantize_config.json"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# vLLM fuses these sibling projections into one module and matches ``dynamic`` patterns against its name.
FUSED_MODULES = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
LAYOUT_KEYS = {"bits": int, "group_size": int, "sym": bool, "desc_act": bool}  # overrides that change the layout
# override keys accepted and ignored: they describe how a layer was quantized, not how it is stored
IGNORED_KEYS = ("damp_percent", "static_groups", "true_sequential", "mse", "act_group_aware", "v2_alpha")


def check_scheme(scheme: QuantScheme) -> None:
    """Refuse, before any work, a scheme that a GPTQ v1 checkpoint cannot hold."""
    if scheme.format != "int":
        raise QuantkitError(f"the GPTQ layout holds only integer-grid weights, not {scheme.format}; use --layout native or compressed-tensors")
    if not scheme.symmetric:
        raise QuantkitError(
            "GPTQ v1 cannot store asymmetric schemes (its minus-one zero-point convention cannot hold zero "
            "point 0); use --layout native or --layout compressed-tensors, or --sym"
        )


def encode(qt: IntQuantizedTensor) -> dict[str, torch.Tensor]:
    """The GPTQ v1 tensors of one layer (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""
    bits = qt.scheme.bits
    zeros = qt.zeros.to(torch.int16) - 1
    if int(zeros.min()) < 0:
        raise QuantkitError("GPTQ v1 cannot store a zero point of 0 (it stores zero - 1)")
    scales = lossless_cast(qt.scales, torch.float16)
    if scales is None:
        raise QuantkitError(f"GPTQ stores float16 scales; these {qt.scales.dtype} scales do not fit float16 exactly")
    return {
        "qweight": pack_rows(qt.codes, bits).t().contiguous(),
        "qzeros": pack_rows(zeros.t().contiguous(), bits),
        "scales": scales.t().contiguous(),
        "g_idx": qt.group_index().to(torch.int32).contiguous(),
    }


def expected_tensors(
    bits: int, groups: int, shape: tuple[int, int], scale_dtype: torch.dtype, with_g_idx: bool
) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of one GPTQ layer's tensors."""
    out_features, in_features = shape
    specs: dict[str, TensorSpec] = {
        "qweight": ((packed_width(in_features, bits), out_features), torch.int32),
        "qzeros": ((groups, packed_width(out_features, bits)), torch.int32),
        "scales": ((groups, out_features), scale_dtype),
    }
    if with_g_idx:
        specs["g_idx"] = ((in_features,), torch.int32)
    return specs


def decode(tensors: dict[str, torch.Tensor], scheme: QuantScheme, shape: tuple[int, int], v1: bool) -> IntQuantizedTensor:
    """One layer's GPTQ tensors (validated shapes) as an IntQuantizedTensor; ``scheme.symmetric`` is ignored."""
    out_features, in_features = shape
    bits, groups = scheme.bits, scheme.num_groups(in_features)
    zeros = unpack_rows(tensors["qzeros"], bits, out_features).t().to(torch.int16) + (1 if v1 else 0)
    if int(zeros.max()) > scheme.maxq:
        raise QuantkitError(f"GPTQ v1 zero point {scheme.maxq + 1} (stored {scheme.maxq}) is outside the {bits}-bit grid")
    g_idx = tensors.get("g_idx")
    if g_idx is not None:
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise QuantkitError(f"g_idx refers to groups outside [0, {groups})")
        if torch.equal(g_idx.to(torch.int32), sequential_g_idx(scheme, in_features)):
            g_idx = None
    mid = (scheme.maxq + 1) // 2
    symmetric = bool((zeros == mid).all())
    return IntQuantizedTensor(
        codes=unpack_rows(tensors["qweight"].t().contiguous(), bits, in_features),
        scales=tensors["scales"].t().contiguous(),
        zeros=zeros.to(torch.uint8).contiguous(),
        scheme=QuantScheme(bits, scheme.group_size, symmetric),
        g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
    )


def layer_tensors(quantized: dict[str, QuantizedTensor]) -> dict[str, torch.Tensor]:
    """Every quantized layer's GPTQ tensors, keyed by full name."""
    out = {}
    for layer, qt in quantized.items():
        out.update({f"{layer}.{name}": t for name, t in encode(qt).items()})  # type: ignore[arg-type]
    return out


def base_scheme(layers: dict[str, QuantizedTensor]) -> QuantScheme:
    """The scheme covering the most quantized weights (ties: the one seen first)."""
    weights: dict[QuantScheme, int] = {}
    for qt in layers.values():
        weights[qt.scheme] = weights.get(qt.scheme, 0) + math.prod(qt.shape)
    return max(weights, key=weights.__getitem__)


def dynamic_overrides(schemes: dict[str, QuantScheme], base: QuantScheme) -> dict[str, dict]:
    """GPTQModel ``dynamic`` entries giving every layer whose scheme is not ``base`` its bits and group size.

    One anchored pattern per distinct scheme; it also names each module vLLM fuses (``FUSED_MODULES``) from
    siblings that all use that scheme.
    """
    groups: dict[QuantScheme, list[str]] = {}
    for name, scheme in schemes.items():
        if scheme != base:
            groups.setdefault(scheme, []).append(name)
    dynamic = {}
    for scheme, names in groups.items():
        members = set(names)
        parents = dict.fromkeys(name.rpartition(".")[0] for name in names)
        fused = [f"{parent}.{module}" for parent in parents for module, parts in FUSED_MODULES.items()
                 if all(f"{parent}.{part}" in members for part in parts)]
        alternatives = "|".join(re.escape(name) for name in [*names, *fused])
        dynamic[f"+:^(?:{alternatives})$"] = {
            key: getattr(scheme, key) for key in ("bits", "group_size") if getattr(scheme, key) != getattr(base, key)
        }
    return dynamic


def build_config(quantized: dict[str, QuantizedTensor], quantkit_config: dict, lm_head: bool) -> dict:
    """The ``quantization_config`` / ``quantize_config.json`` content: the most common scheme at the top level,
    the others as ``dynamic`` overrides; refuses what a GPTQ v1 config cannot say."""
    layers = grid_layers(quantized, "GPTQ", floats=False)
    for scheme in dict.fromkeys(qt.scheme for qt in layers.values()):
        check_scheme(scheme)
    base = base_scheme(layers)
    dynamic = dynamic_overrides({name: qt.scheme for name, qt in layers.items()}, base)
    quantizer = quantkit_config.get("quantizer") or {}
    calibration = quantkit_config.get("calibration") or {}
    desc_act = any(qt.g_idx is not None for qt in layers.values())
    damp = float(quantizer.get("damp", 0.01))
    static_groups = bool(quantizer.get("static_groups", False))
    true_sequential = bool(calibration.get("true_sequential", True))
    return {
        "quant_method": "gptq",
        "bits": base.bits,
        "group_size": base.group_size,
        "desc_act": desc_act,
        "sym": True,
        "lm_head": lm_head,
        "checkpoint_format": V1,
        "format": V1,
        "pack_dtype": "int32",
        "damp_percent": damp,
        "static_groups": static_groups,
        "true_sequential": true_sequential,
        **({"dynamic": dynamic} if dynamic else {}),
        "meta": {
            "quantizer": [f"quantkit:{__version__}"],
            "method": quantkit_config.get("method"),
            "damp_percent": damp,
            "static_groups": static_groups,
            "true_sequential": true_sequential,
            "mse": bool(quantizer.get("mse", False)),
        },
    }


@dataclass(frozen=True)
class DynamicRule:
    """One ``dynamic`` entry: modules whose name ``re.match``es ``pattern`` use ``config`` (None: not quantized)."""

    key: str
    pattern: re.Pattern[str]
    config: GPTQConfig | None


@dataclass(frozen=True)
class GPTQConfig:
    """What the loader needs from a GPTQ config."""

    bits: int
    group_size: int
    v1: bool
    sym: bool = True
    desc_act: bool = False
    dynamic: tuple[DynamicRule, ...] = ()

    def __post_init__(self) -> None:
        self.scheme()  # validates bits and group size

    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, True)

    def layer(self, name: str) -> GPTQConfig:
        """The config of stored quantized module ``name``: the first ``dynamic`` pattern it matches, else the
        top level; refuses a ``-:`` match (the config says the module is not quantized)."""
        for rule in self.dynamic:
            if rule.pattern.match(name):
                if rule.config is None:
                    raise QuantkitError(f"GPTQ dynamic entry {rule.key!r} says {name} is not quantized, "
                                        f"but the checkpoint stores {name}.qweight")
                return rule.config
        return self


def _layout_values(key: str, overrides: object) -> dict:
    """The layout keys of one ``dynamic`` entry's overrides, typed; refuses a key quantkit does not know."""
    if not isinstance(overrides, dict):
        raise QuantkitError(f"GPTQ dynamic entry {key!r} must map to a dict, not {type(overrides).__name__}")
    unknown = [k for k in overrides if k not in LAYOUT_KEYS and k not in IGNORED_KEYS]
    if unknown:
        raise QuantkitError(f"GPTQ dynamic entry {key!r} overrides {unknown[0]!r}; quantkit reads "
                            f"{', '.join(LAYOUT_KEYS)} (and ignores {', '.join(IGNORED_KEYS)})")
    return {k: check_type(v, LAYOUT_KEYS[k], f"GPTQ dynamic entry {key!r}: {k}") for k, v in overrides.items()
            if k in LAYOUT_KEYS}


def _dynamic_rule(key: str, overrides: object, base: GPTQConfig) -> DynamicRule:
    """One validated ``dynamic`` entry (``-:``, ``+:`` or no prefix, then a regular expression)."""
    values = _layout_values(key, overrides)
    excluded = key.startswith("-:")
    try:
        pattern = re.compile(key.removeprefix("-:") if excluded else key.removeprefix("+:"))
    except re.error as exc:
        raise QuantkitError(f"GPTQ dynamic pattern {key!r} is not a valid regular expression: {exc}") from None
    try:
        return DynamicRule(key, pattern, None if excluded else replace(base, **values))
    except QuantkitError as exc:
        raise QuantkitError(f"GPTQ dynamic entry {key!r}: {exc}") from None


def parse_config(qc: dict) -> GPTQConfig:
    """Validate a GPTQ quantization config (with its ``dynamic`` overrides) for loading; one-line errors for
    anything unsupported."""
    checkpoint_format = str(qc.get("checkpoint_format") or qc.get("format") or V1).lower()
    if checkpoint_format not in (V1, V2):
        raise QuantkitError(f"unsupported GPTQ checkpoint_format {checkpoint_format!r}; quantkit reads gptq (v1) and gptq_v2")
    if qc.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
        raise QuantkitError(f"unsupported GPTQ pack_dtype {qc.get('pack_dtype')!r}; quantkit reads int32")
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise QuantkitError(f"GPTQ dynamic must be a dict of pattern -> overrides, not {type(dynamic).__name__}")
    try:
        base = GPTQConfig(field(qc, "bits", int), field(qc, "group_size", int, -1), checkpoint_format == V1,
                          field(qc, "sym", bool, True), field(qc, "desc_act", bool, False))
    except QuantkitError as exc:
        raise QuantkitError(f"invalid GPTQ quantization config: {exc}") from None
    rules = tuple(_dynamic_rule(key, overrides, base) for key, overrides in dynamic.items())
    return replace(base, dynamic=rules)


ROLES = {"qweight": "codes", "qzeros": "statistics", "scales": "statistics", "g_idx": "permutation"}


class GPTQLayout(Layout):
    """GPTQ v1 written (float16 scales, always with ``g_idx``), v1 and v2 read."""

    name = "gptq"
    quant_method = "gptq"
    kinds = ("int",)
    runtimes = ("quantkit.load", "transformers", "vLLM", "GPTQModel")

    def check_scheme(self, scheme: QuantScheme, column_groups: bool = False) -> None:
        check_scheme(scheme)

    def refusing_runtimes(self, scheme: QuantScheme, column_groups: bool = False) -> list[str]:
        lines = []
        if column_groups and scheme.group_size != -1:
            lines.append("vLLM refuses GPTQ checkpoints with act-order groups (desc_act=True, g_idx): drop --g-idx "
                         "(act-order then stores no g_idx)")
        if scheme.bits not in VLLM_WEIGHT_BITS:
            lines.append(f"vLLM's CPU build serves 4- and 8-bit GPTQ only, not {scheme.bits}-bit: use --bits 4 or --bits 8")
        return lines

    def refusing_moe_runtimes(self, scheme: QuantScheme) -> list[str]:
        return vllm_moe_refusals(scheme)

    def encode(self, model: nn.Module, quantized: dict[str, QuantizedTensor], quantization_config: dict,
               dtype: torch.dtype) -> Encoded:
        qc = build_config(quantized, quantization_config, lm_head="lm_head" in quantized)
        return Encoded(layer_tensors(quantized), qc, {CONFIG_FILE: qc})

    def plan(self, model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
        """Every linear with a stored ``qweight`` is quantized with the config's scheme for it (the top-level
        one or its first matching ``dynamic`` override)."""
        config = parse_config(qc)
        plans = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or f"{name}.qweight" not in headers:
                continue
            layer = config.layer(name)
            scheme = layer.scheme()
            shape = (module.out_features, module.in_features)
            scale_dtype = header_dtype(headers, f"{name}.scales", SCALE_DTYPES)
            specs = expected_tensors(scheme.bits, scheme.num_groups(module.in_features), shape, scale_dtype,
                                     with_g_idx=f"{name}.g_idx" in headers)
            meta = int_description(scheme.bits, scheme.group_size, layer.sym, layer.desc_act and "g_idx" in specs, shape)
            plans[name] = LayerPlan(specs, meta, ROLES, lambda t, scheme=scheme, shape=shape: decoded(
                decode(t, scheme, shape, config.v1)))
        if not plans:
            raise QuantkitError("GPTQ checkpoint has no quantized layer (no tensor named *.qweight for a linear layer)")
        return plans

    def nbytes(self, meta: dict, shape: tuple[int, int], dtype: torch.dtype) -> int:
        scheme = QuantScheme(int(meta["bits"]), int(meta["group_size"]))
        return specs_bytes(expected_tensors(scheme.bits, scheme.num_groups(shape[1]), shape, torch.float16,
                                            with_g_idx=True))

    def roles(self, meta: dict) -> dict[str, str]:
        return ROLES
