"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor / vLLM), written and read.

Per quantized linear (``out`` x ``in``, ``b`` bits, ``G`` groups): ``weight_packed`` int32
``[out, ceil(in*b/32)]``, each row a little-endian bit stream of the signed values shifted by ``+2**(b-1)``;
``weight_scale`` ``[out, G]``; ``weight_shape`` int64 ``[2]``; asymmetric only ``weight_zero_point`` int32
``[ceil(out*b/32), G]`` (packed along dim 0, shifted the same way); with act-order ``weight_g_idx`` int32
``[in]``. Our unsigned code ``c`` with zero ``z`` is the signed pair ``(c - 2**(b-1), z - 2**(b-1))``, so
the shifted values stored are exactly ``c`` and ``z``, and symmetric (``z = 2**(b-1)``) means signed zero 0.

FP4 layers use ``nvfp4-pack-quantized`` (E4M3 scales over 16 columns, ``strategy: tensor_group`` with a
``weight_global_scale``) or ``mxfp4-pack-quantized`` (E8M0 scales over 32 columns, ``strategy: group``), whose
tensors are exactly quantkit's native ones (:mod:`quantkit.formats.floatgrid`).

With quantized activations (W8A8, W4A8) integer weights are ``int-quantized``, as vLLM's W8A8 kernels read
them: ``weight`` int8 ``[out, in]`` holding the signed values ``c - 2**(b-1)`` (symmetric only) and
``weight_scale`` float32 ``[out, G]``. FP8 weights are ``float-quantized``: ``weight`` float8_e4m3fn ``[out, in]``
and ``weight_scale`` float32 ``[out, G]`` (``strategy: channel`` or ``group``), ``[1]`` (``tensor``) or
``[ceil(out/r), in/c]`` (``block`` with ``block_structure: [r, c]``). Activations are a config group's
``input_activations``: static per tensor (``strategy: tensor``, ``dynamic: false``, each layer's float32
``input_scale [1]``) or dynamic per token (``strategy: token``, ``dynamic: true``), int8 or FP8 (``type: float``);
FP8 also dynamic per group of columns of each token (``strategy: group``, as beside block weights). NVFP4 activations (W4A4) are
``strategy: tensor_group`` over 16 elements with ``dynamic: local``: the blocks' scales are computed at run time
against the layer's calibrated float32 ``input_global_scale [1]`` (the reciprocal of quantkit's static
``input_scale``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import torch
from torch import nn

from quantkit.actquant import (
    OBSERVERS,
    STATIC_FORMATS,
    InputQuantization,
    StaticActivations,
    activation_scheme,
)
from quantkit.config_fields import optional_field
from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor, TensorSpec, tensor_kind
from quantkit.formats.e2m1 import SCALE_CODECS
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.fp8 import FP8QuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.packing import pack_columns, pack_rows, packed_width, unpack_columns, unpack_rows
from quantkit.kvcache import KVCacheQuantization
from quantkit.layouts.base import Encoded, Headers, LayerPlan, Layout, specs_bytes
from quantkit.layouts.common import (
    VLLM_WEIGHT_BITS,
    decoded,
    grid_layers,
    header_dtype,
    int_description,
    lossless_cast,
    vllm_moe_refusals,
)
from quantkit.schemes import FP8_FORMAT, QuantScheme

FORMAT = "pack-quantized"
INT_UNPACKED = "int-quantized"  # one int8 per weight: W8A8 (and W4A8) with quantized activations
FP8_LAYOUT = "float-quantized"
FLOAT_LAYOUTS = {"nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
FORMATS = (FORMAT, INT_UNPACKED, FP8_LAYOUT, *FLOAT_LAYOUTS.values())
_FLOAT_STRATEGY = {"nvfp4": "tensor_group", "mxfp4": "group"}
QUANT_METHOD = "compressed-tensors"
# The compressed-tensors release whose layout this matches (dense packing; identical for 2/4/8 bits in all).
CT_VERSION = "0.20.0"
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


ACT_ORDER_GROUPS_REFUSED = (
    "compressed-tensors no longer reads act-order groups (actorder='group' with weight_g_idx was removed in "
    "compressed-tensors 0.20); quantize with --static-groups, or use --layout gptq or native"
)


NVFP4_GROUP = 16
INPUT_GLOBAL_SCALE = "input_global_scale"  # NVFP4 activations' calibrated divisor, 1 / input_scale


def check_activations(inputs: InputQuantization) -> None:
    """Refuse activation quantization compressed-tensors (as quantkit writes it) does not express: 8-bit int or
    FP8, static per tensor or dynamic per token (FP8 also per group); NVFP4 with a static global scale."""
    scheme, static = inputs.scheme, inputs.static
    if scheme.format == "nvfp4":
        if static is None:
            raise QuantkitError("compressed-tensors NVFP4 activations need a calibrated global scale: add --act-static "
                                "(or use --layout native for per-token global scales)")
        return
    dynamic_fp8_groups = scheme.is_fp8 and static is None
    if scheme.format not in STATIC_FORMATS or scheme.bits != 8 or (scheme.group_size != -1 and not dynamic_fp8_groups):
        raise QuantkitError(f"compressed-tensors export writes 8-bit int or fp8 activations per tensor or per token "
                            f"(fp8 also dynamic per group), not {scheme.bits}-bit {scheme.format} with group size "
                            f"{scheme.group_size}{' static' if static else ''}; use --layout native")
    if static is not None and static.granularity != "tensor":
        raise QuantkitError("compressed-tensors export writes static activation scales per tensor (vLLM refuses "
                            "per-channel ones); use --act-granularity tensor or --layout native")


def check_scheme(scheme: QuantScheme, column_groups: bool = False) -> None:
    """Refuse, before any work, a scheme (and act-order grouping) that this exporter will not write."""
    if column_groups:
        raise QuantkitError(ACT_ORDER_GROUPS_REFUSED)
    if scheme.is_fp8 and fp8_strategy(scheme) is None:
        raise QuantkitError(f"compressed-tensors holds fp8 weight scales per tensor, channel, group or 2-D block, not "
                            f"{scheme.block_rows} rows x group size {scheme.group_size}; use --layout native")
    if scheme.is_float and scheme.format not in FLOAT_LAYOUTS:
        raise QuantkitError(
            f"compressed-tensors has no layout for {scheme.format} (float16 block scales); use mxfp4 or nvfp4, "
            "or --layout native"
        )
    if scheme.bits == 3:
        raise QuantkitError(
            "compressed-tensors 3-bit packing differs between compressed-tensors versions; use --layout native "
            "or --layout gptq for 3 bits"
        )


def fp8_strategy(scheme: QuantScheme) -> str | None:
    """The compressed-tensors strategy of fp8 weight scales (None: none holds them)."""
    per_row, whole_row = scheme.block_rows == 1, scheme.group_size == -1
    if scheme.block_rows == -1:
        return "tensor" if whole_row else None
    if per_row:
        return "channel" if whole_row else "group"
    return None if whole_row else "block"


def check_layer(name: str, scheme: QuantScheme, in_features: int) -> None:
    """compressed-tensors groups (FP4 blocks too) must tile the row exactly; fp8's 2-D blocks may end partial."""
    check_scheme(scheme)
    partial_blocks = scheme.is_fp8 and fp8_strategy(scheme) == "block"
    if scheme.group_size != -1 and in_features % scheme.group_size and not partial_blocks:
        raise QuantkitError(
            f"compressed-tensors needs in_features divisible by the group size; {name} has {in_features} "
            f"columns and group size {scheme.group_size}"
        )


def encode(qt: QuantizedTensor, scale_dtype: torch.dtype, unpacked: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one layer; integer scales in ``scale_dtype`` when that is lossless; ``unpacked``: integers
    ``int-quantized``."""
    if isinstance(qt, FloatQuantizedTensor):
        return qt.to_tensors()
    if isinstance(qt, FP8QuantizedTensor):
        scales = qt.scales.float().reshape(1) if fp8_strategy(qt.scheme) == "tensor" else qt.scales.float()
        return {"weight": qt.values.contiguous(), "weight_scale": scales.contiguous()}
    if not isinstance(qt, IntQuantizedTensor):
        raise QuantkitError(f"compressed-tensors export cannot hold {qt.meta()['kind']} layers")
    if qt.g_idx is not None:
        raise QuantkitError(ACT_ORDER_GROUPS_REFUSED)
    if unpacked:
        if not qt.scheme.symmetric:
            raise QuantkitError("compressed-tensors int-quantized weights (with quantized activations) are symmetric; "
                                "drop --asym")
        middle = 2 ** (qt.scheme.bits - 1)
        return {"weight": (qt.codes.to(torch.int16) - middle).to(torch.int8).contiguous(),
                "weight_scale": qt.scales.float().contiguous()}
    bits = qt.scheme.bits
    scales = lossless_cast(qt.scales, scale_dtype)
    tensors = {
        "weight_packed": pack_rows(qt.codes, bits),
        "weight_scale": (qt.scales if scales is None else scales).contiguous(),
        "weight_shape": torch.tensor(qt.shape, dtype=torch.int64),
    }
    if not qt.scheme.symmetric:
        tensors["weight_zero_point"] = pack_columns(qt.zeros, bits)
    return tensors


def expected_tensors(args: WeightArgs, shape: tuple[int, int], scale_dtype: torch.dtype) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of one layer's tensors."""
    out_features, in_features = shape
    scheme = args.scheme()
    if scheme.is_float:
        return FloatQuantizedTensor.expected_tensors(scheme.to_dict(), shape)
    groups = scheme.num_groups(in_features)
    if scheme.is_fp8:
        scales = (1,) if fp8_strategy(scheme) == "tensor" else (scheme.num_row_blocks(out_features), groups)
        return {"weight": ((out_features, in_features), torch.float8_e4m3fn), "weight_scale": (scales, torch.float32)}
    if args.layout == INT_UNPACKED:
        return {"weight": ((out_features, in_features), torch.int8),
                "weight_scale": ((out_features, groups), torch.float32)}
    specs: dict[str, TensorSpec] = {
        "weight_packed": ((out_features, packed_width(in_features, scheme.bits)), torch.int32),
        "weight_scale": ((out_features, groups), scale_dtype),
        "weight_shape": ((2,), torch.int64),
    }
    if not scheme.symmetric:
        specs["weight_zero_point"] = ((packed_width(out_features, scheme.bits), groups), torch.int32)
    if args.g_idx:
        specs["weight_g_idx"] = ((in_features,), torch.int32)
    return specs


def decode(tensors: dict[str, torch.Tensor], args: WeightArgs, shape: tuple[int, int]) -> QuantizedTensor:
    """One layer's tensors (validated shapes) as a quantized tensor."""
    out_features, in_features = shape
    scheme = args.scheme()
    if scheme.is_float:
        return FloatQuantizedTensor.from_tensors(tensors, scheme.to_dict(), shape)
    if scheme.is_fp8:
        scales = tensors["weight_scale"].reshape(scheme.num_row_blocks(out_features), scheme.num_groups(in_features))
        return FP8QuantizedTensor.from_tensors({"weight_fp8": tensors["weight"], "weight_scale": scales},
                                               scheme.to_dict(), shape)
    if args.layout == INT_UNPACKED:
        middle = 2 ** (scheme.bits - 1)
        signed = tensors["weight"].to(torch.int16)
        if int(signed.min()) < -middle or int(signed.max()) >= middle:
            raise QuantkitError(f"weight holds values outside the {scheme.bits}-bit range")
        codes = (signed + middle).to(torch.uint8)
        zeros = torch.full((out_features, scheme.num_groups(in_features)), middle, dtype=torch.uint8)
        return IntQuantizedTensor(codes=codes, scales=tensors["weight_scale"].contiguous(), zeros=zeros, scheme=scheme)
    if tensors["weight_shape"].tolist() != [out_features, in_features]:
        raise QuantkitError(f"weight_shape {tensors['weight_shape'].tolist()} does not match the layer's {list(shape)}")
    groups = scheme.num_groups(in_features)
    if scheme.symmetric:
        zeros = torch.full((out_features, groups), (scheme.maxq + 1) // 2, dtype=torch.uint8)
    else:
        zeros = unpack_columns(tensors["weight_zero_point"], scheme.bits, out_features)
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
        raise QuantkitError(f"weight_g_idx refers to groups outside [0, {groups})")
    return IntQuantizedTensor(
        codes=unpack_rows(tensors["weight_packed"], scheme.bits, in_features),
        scales=tensors["weight_scale"].contiguous(),
        zeros=zeros.contiguous(),
        scheme=scheme,
        g_idx=None if g_idx is None else g_idx.to(torch.int32).contiguous(),
    )


def _weights_args(qt: QuantizedTensor, observer: str) -> dict:
    s = qt.scheme  # type: ignore[attr-defined]
    if s.is_fp8:
        strategy = fp8_strategy(s)
        return {"num_bits": 8, "type": "float", "symmetric": True,
                "group_size": s.group_size if strategy == "group" else None, "strategy": strategy,
                "block_structure": [s.block_rows, s.group_size] if strategy == "block" else None,
                "dynamic": False, "observer": observer}
    if s.is_float:
        return {
            "num_bits": 4,
            "type": "float",
            "symmetric": True,
            "group_size": s.group_size,
            "strategy": _FLOAT_STRATEGY[s.format],
            "dynamic": False,
            "observer": observer,
            "scale_dtype": str(SCALE_CODECS[s.format].dtype),
        }
    return {
        "num_bits": s.bits,
        "type": "int",
        "symmetric": s.symmetric,
        "group_size": None if s.group_size == -1 else s.group_size,
        "strategy": "channel" if s.group_size == -1 else "group",
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "observer": observer,
        "observer_kwargs": {},
    }


def _activations_args(inputs: InputQuantization) -> dict:
    """A config group's ``input_activations`` entry."""
    scheme, static = inputs.scheme, inputs.static
    if scheme.format == "nvfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "group_size": NVFP4_GROUP,
                "strategy": "tensor_group", "dynamic": "local", "observer": static.observer}
    grouped = scheme.group_size != -1
    return {"num_bits": 8, "type": "float" if scheme.is_fp8 else "int", "symmetric": True,
            "group_size": scheme.group_size if grouped else None,
            "strategy": "tensor" if static is not None else "group" if grouped else "token", "dynamic": static is None,
            "observer": None if static is None else static.observer}


def _recorded_inputs(quantkit_config: dict) -> InputQuantization | None:
    recorded = quantkit_config.get("input_activations")
    return None if recorded is None else InputQuantization.from_record(recorded)


def layer_tensors(quantized: dict[str, QuantizedTensor], scale_dtype: torch.dtype,
                  unpacked: bool = False) -> dict[str, torch.Tensor]:
    """Every quantized layer's tensors, keyed by full name (layers checked by :func:`build_config`); integers
    ``int-quantized`` when ``unpacked``."""
    out = {}
    for layer, qt in quantized.items():
        out.update({f"{layer}.{name}": t for name, t in encode(qt, scale_dtype, unpacked).items()})  # type: ignore[arg-type]
    return out


def _matmul_weight(module: nn.Module) -> bool:
    """Whether a module multiplies by a weight matrix of its own: a linear, or a linear by another class (an MoE
    router, which vLLM builds as a linear and would otherwise take for a quantized one); not an embedding."""
    weight = module._parameters.get("weight")
    return isinstance(module, nn.Linear) or (weight is not None and weight.dim() == 2
                                             and not isinstance(module, nn.Embedding))


def build_config(quantized: dict[str, QuantizedTensor], model: nn.Module, quantkit_config: dict) -> dict:
    """The ``quantization_config``: one config group per distinct weights scheme, the other linears ignored."""
    layers = grid_layers(quantized, "compressed-tensors")
    observer = "mse" if (quantkit_config.get("quantizer") or {}).get("mse") else "minmax"
    inputs = _recorded_inputs(quantkit_config)
    if inputs is not None:
        check_activations(inputs)
    groups: list[tuple[dict, list[str]]] = []
    for name, qt in layers.items():
        check_layer(name, qt.scheme, qt.shape[1])
        args = _weights_args(qt, observer)
        for existing, names in groups:
            if existing == args:
                names.append(name)
                break
        else:
            groups.append((args, [name]))
    config_groups = {
        f"group_{i}": {
            "targets": ["Linear"] if len(groups) == 1 else names,
            "weights": args,
            "input_activations": None if inputs is None else _activations_args(inputs),
            "output_activations": None,
            "format": _layout(args, inputs is not None),
        }
        for i, (args, names) in enumerate(groups)
    }
    layouts = {group["format"] for group in config_groups.values()}
    ignore = [n for n, m in model.named_modules() if _matmul_weight(m) and n not in layers]
    return {
        "quant_method": QUANT_METHOD,
        "format": layouts.pop() if len(layouts) == 1 else "mixed-precision",
        "version": CT_VERSION,
        "config_groups": config_groups,
        "ignore": ignore,
        "kv_cache_scheme": _kv_cache_scheme(quantkit_config),
        "quantization_status": "compressed",
        "sparsity_config": {},
        "global_compression_ratio": None,
    }


def _kv_cache_scheme(quantkit_config: dict) -> dict | None:
    """The ``kv_cache_scheme`` of a run's KV-cache quantization (per tensor: ``k_scale``/``v_scale [1]`` on each
    attention module)."""
    recorded = quantkit_config.get("kv_cache")
    if recorded is None:
        return None
    kv = KVCacheQuantization.from_record(recorded)
    check_kv_cache(kv)
    return {"num_bits": 8, "type": "float" if kv.format == FP8_FORMAT else "int", "symmetric": True,
            "strategy": "tensor", "dynamic": False, "group_size": None}


def check_kv_cache(kv: KVCacheQuantization) -> None:
    """compressed-tensors' kv_cache_scheme as quantkit writes it holds one scale per layer."""
    if kv.granularity != "tensor":
        raise QuantkitError("compressed-tensors export writes one KV-cache scale per layer; use --kv-granularity "
                            "tensor or --layout native")


def parse_kv_cache(qc: dict) -> KVCacheQuantization | None:
    """The KV-cache quantization of a config: 8-bit int or float, static, one scale per layer."""
    entry = qc.get("kv_cache_scheme")
    if not entry:
        return None
    if not isinstance(entry, dict):
        raise QuantkitError("compressed-tensors kv_cache_scheme is not an object")
    try:
        kind = optional_field(entry, "type", str, "float")
        bits = optional_field(entry, "num_bits", int, 8)
        strategy = optional_field(entry, "strategy", str, "tensor")
        dynamic = optional_field(entry, "dynamic", bool, False)
    except QuantkitError as exc:
        raise QuantkitError(f"compressed-tensors kv_cache_scheme {exc}") from None
    if kind not in ("int", "float") or bits != 8 or strategy != "tensor" or dynamic:
        raise QuantkitError(f"compressed-tensors kv_cache_scheme {kind} {bits}-bit {strategy}"
                            f"{' dynamic' if dynamic else ''} is not supported (8-bit, static, per tensor)")
    return KVCacheQuantization(FP8_FORMAT if kind == "float" else "int", "tensor")


def _layout(weights: dict, activations: bool) -> str:
    """The compressed-tensors format of a config group's weights entry (``activations``: quantized too)."""
    if weights["type"] == "float":
        if weights["num_bits"] == 8:
            return FP8_LAYOUT
        return FLOAT_LAYOUTS["nvfp4" if weights["strategy"] == "tensor_group" else "mxfp4"]
    return INT_UNPACKED if activations else FORMAT


@dataclass(frozen=True)
class WeightArgs:
    """The weights entry of one config group, as far as decoding needs it."""

    bits: int
    group_size: int
    symmetric: bool
    g_idx: bool
    format: str = "int"
    layout: str = FORMAT  # the compressed-tensors format of its config group
    block_rows: int = 1

    def scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.symmetric, self.format, self.block_rows)


@dataclass(frozen=True)
class ConfigGroup:
    targets: tuple[str, ...]
    weights: WeightArgs


_ACTORDERS = ("group", "weight", "static", "dynamic")


@dataclass(frozen=True)
class _WeightFields:
    """The typed fields of a weights entry (null or absent: the compressed-tensors default)."""

    type: str
    bits: int
    group_size: int | None
    strategy: str
    symmetric: bool
    actorder: bool | str | None
    block_structure: tuple[int, int] | None


def _weight_fields(weights: dict) -> _WeightFields:
    kind = optional_field(weights, "type", str, "int")
    bits = optional_field(weights, "num_bits", int, 8)
    group_size = optional_field(weights, "group_size", int, None)
    strategy = optional_field(weights, "strategy", str, "channel" if group_size in (None, -1) else "group")
    actorder = weights.get("actorder")
    if not (actorder is None or type(actorder) is bool or (isinstance(actorder, str) and actorder in _ACTORDERS)):
        raise QuantkitError(f"unknown actorder {actorder!r}")
    block = weights.get("block_structure")
    if block is not None and not (isinstance(block, list) and len(block) == 2
                                  and all(type(v) is int and v > 0 for v in block)):
        raise QuantkitError(f"block_structure {block!r} is not two positive integers")
    return _WeightFields(kind, bits, group_size, strategy, optional_field(weights, "symmetric", bool, True), actorder,
                         None if block is None else (block[0], block[1]))


def _parse_weights(name: str, weights: object, layout: str) -> WeightArgs:
    if not isinstance(weights, dict):
        raise QuantkitError(f"compressed-tensors config group {name} has no weights entry")
    if weights.get("dynamic") not in (None, False):
        raise QuantkitError("dynamic compressed-tensors weight quantization is not supported")
    try:
        fields = _weight_fields(weights)
    except QuantkitError as exc:
        raise QuantkitError(f"compressed-tensors config group {name}: weights {exc}") from None
    if fields.type == "float":
        return replace(_parse_float_weights(fields), layout=layout)
    if fields.type != "int":
        raise QuantkitError(f"compressed-tensors weights of type {fields.type!r} are not supported")
    if fields.strategy not in ("group", "channel"):
        raise QuantkitError(f"compressed-tensors strategy {fields.strategy!r} is not supported (group or channel)")
    if fields.bits == 3:
        raise QuantkitError("3-bit compressed-tensors checkpoints are not supported (packing differs between versions)")
    group_size = -1 if fields.strategy == "channel" else fields.group_size or 0
    args = WeightArgs(fields.bits, group_size, fields.symmetric, fields.actorder in ("group", "dynamic", True),
                      layout=layout)
    args.scheme()  # validates bits and group size
    if layout == INT_UNPACKED and not args.symmetric:
        raise QuantkitError("asymmetric int-quantized compressed-tensors weights are not supported")
    return args


def _parse_float_weights(fields: _WeightFields) -> WeightArgs:
    """NVFP4 (4 bits, tensor_group of 16), MXFP4 (4 bits, group of 32) or FP8 (8 bits, per tensor, channel, group or
    2-D block) weights; anything else is refused."""
    shape = (fields.bits, fields.strategy, fields.group_size)
    if fields.bits == 8 and fields.strategy in ("channel", "group", "tensor"):
        return WeightArgs(8, fields.group_size or 0 if fields.strategy == "group" else -1, True, False, FP8_FORMAT,
                          block_rows=-1 if fields.strategy == "tensor" else 1)
    if fields.bits == 8 and fields.strategy == "block":
        if fields.block_structure is None:
            raise QuantkitError("compressed-tensors fp8 block weights have no block_structure")
        rows, columns = fields.block_structure
        return WeightArgs(8, columns, True, False, FP8_FORMAT, block_rows=rows)
    for fmt, expected in (("nvfp4", (4, "tensor_group", 16)), ("mxfp4", (4, "group", 32))):
        if shape == expected:
            return WeightArgs(4, expected[2], True, False, fmt)
    raise QuantkitError(f"compressed-tensors float weights with bits/strategy/group {shape} are not supported "
                        "(NVFP4, MXFP4, or FP8 per tensor, channel, group or block)")


def _parse_activations(name: str, entry: object) -> InputQuantization:
    """A config group's ``input_activations``: 8-bit int or FP8, static per tensor or dynamic per token (FP8 also
    dynamic per group)."""
    if not isinstance(entry, dict):
        raise QuantkitError(f"compressed-tensors config group {name}: input_activations is not an object")
    observer = entry.get("observer")  # the calibration's name for it; any other tool's counts as minmax
    observer = observer if observer in OBSERVERS else "minmax"
    nvfp4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": NVFP4_GROUP, "dynamic": "local"}
    if all(entry.get(key) == value for key, value in nvfp4.items()) and entry.get("symmetric", True) is True:
        return InputQuantization(activation_scheme(4, "nvfp4"),
                                 StaticActivations("tensor", "minmax" if observer == "mse" else observer))
    try:
        kind = optional_field(entry, "type", str, "int")
        bits = optional_field(entry, "num_bits", int, 8)
        strategy = optional_field(entry, "strategy", str, "tensor")
        dynamic = optional_field(entry, "dynamic", bool, False)
        symmetric = optional_field(entry, "symmetric", bool, True)
        group_size = optional_field(entry, "group_size", int, None) if strategy == "group" else None
    except QuantkitError as exc:
        raise QuantkitError(f"compressed-tensors config group {name}: input_activations {exc}") from None
    supported = (("tensor", False), ("token", True)) + ((("group", True),) if kind == "float" else ())
    if kind not in ("int", "float") or bits != 8 or not symmetric or (strategy, dynamic) not in supported:
        raise QuantkitError(f"compressed-tensors activations {kind} {bits}-bit {strategy} "
                            f"{'dynamic' if dynamic else 'static'}{'' if symmetric else ' asymmetric'} are not "
                            "supported (8-bit int or float, symmetric, static per tensor or dynamic per token; float "
                            "also dynamic per group)")
    if strategy == "group" and (group_size is None or group_size < 1):
        raise QuantkitError(f"compressed-tensors config group {name}: group activations need a positive group_size")
    scheme = activation_scheme(8, FP8_FORMAT if kind == "float" else "int", group_size)
    return InputQuantization(scheme, None if dynamic else StaticActivations("tensor", observer))


def parse_config(qc: dict) -> tuple[list[ConfigGroup], list[str], InputQuantization | None]:
    """Config groups, ignore list and activation quantization (one for all groups) of a config; one-line errors
    for anything unsupported."""
    if qc.get("quantization_status", "compressed") != "compressed":
        raise QuantkitError(f"compressed-tensors checkpoint is not compressed (status {qc.get('quantization_status')!r})")
    if qc.get("sparsity_config") or qc.get("transform_config"):
        raise QuantkitError("compressed-tensors sparsity and transforms are not supported")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantkitError("compressed-tensors quantization_config has no config_groups")
    parsed, activations = [], set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise QuantkitError(f"compressed-tensors config group {name} is not an object")
        fmt = group.get("format") or qc.get("format")
        if fmt not in FORMATS:
            raise QuantkitError(f"compressed-tensors format {fmt!r} is not supported; quantkit reads {', '.join(FORMATS)}")
        if group.get("output_activations"):
            raise QuantkitError("compressed-tensors output activation quantization is not supported")
        entry = group.get("input_activations")
        activations.add(None if not entry else _parse_activations(name, entry))
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise QuantkitError(f"compressed-tensors config group {name} has no list of targets")
        weights = _parse_weights(name, group.get("weights"), fmt)
        expected = (FP8_LAYOUT,) if weights.format == FP8_FORMAT else (FLOAT_LAYOUTS[weights.format],) \
            if weights.format in FLOAT_LAYOUTS else (FORMAT, INT_UNPACKED)
        if fmt not in expected:
            raise QuantkitError(f"compressed-tensors config group {name}: format {fmt} does not match its weights")
        parsed.append(ConfigGroup(tuple(targets), weights))
    if len(activations) > 1:
        raise QuantkitError("compressed-tensors config groups quantize their input activations differently; "
                            "quantkit reads one activation scheme for all")
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise QuantkitError("compressed-tensors ignore entry is not a list of module names")
    return parsed, ignore, activations.pop()


def matches(name: str, module: nn.Module, patterns) -> bool:
    """compressed-tensors target matching: ``re:`` regex on the module name, the class name, or the name itself."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern == name or pattern == type(module).__name__:
            return True
    return False


UNPACKED_ROLES = {"weight": "codes", "weight_scale": "statistics"}
INT_ROLES = {"weight_packed": "codes", "weight_scale": "statistics", "weight_zero_point": "statistics",
             "weight_g_idx": "permutation", "weight_shape": "other"}


def _scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype integer float16 scales take in a model of ``dtype``: its own when wider (a lossless cast),
    else float16 (bfloat16 when that is lossless: the same size)."""
    return torch.float16 if dtype.itemsize <= 2 else dtype


class CompressedTensorsLayout(Layout):
    """pack-quantized (integer) and nvfp4/mxfp4-pack-quantized, one config group per distinct scheme."""

    name = "compressed-tensors"
    quant_method = QUANT_METHOD
    kinds = ("int", "e2m1", "fp8")
    runtimes = ("quantkit.load", "transformers", "vLLM")

    def check_scheme(self, scheme: QuantScheme, column_groups: bool = False) -> None:
        check_scheme(scheme, column_groups)

    def refusing_runtimes(self, scheme: QuantScheme, column_groups: bool = False) -> list[str]:
        if scheme.format == "int" and scheme.bits not in VLLM_WEIGHT_BITS:
            return [f"vLLM's CPU build serves 4- and 8-bit compressed-tensors weights (W4A16, W8A16) only, not "
                    f"{scheme.bits}-bit: use --bits 4 or --bits 8"]
        return []

    def refusing_moe_runtimes(self, scheme: QuantScheme) -> list[str]:
        return vllm_moe_refusals(scheme)

    def check_layer(self, name: str, scheme: QuantScheme, in_features: int) -> None:
        check_layer(name, scheme, in_features)

    def encode(self, model: nn.Module, quantized: dict[str, QuantizedTensor], quantization_config: dict,
               dtype: torch.dtype) -> Encoded:
        qc = build_config(quantized, model, quantization_config)
        return Encoded(layer_tensors(quantized, dtype, _recorded_inputs(quantization_config) is not None), qc)

    def plan(self, model: nn.Module, qc: dict, headers: Headers) -> dict[str, LayerPlan]:
        """The linears matched by a config group's targets and not ignored."""
        groups, ignore, _ = parse_config(qc)
        plans = {}
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or matches(name, module, ignore):
                continue
            group = next((g for g in groups if matches(name, module, g.targets)), None)
            if group is None:
                continue
            shape = (module.out_features, module.in_features)
            w = group.weights
            check_layer(name, w.scheme(), module.in_features)
            specs = expected_tensors(w, shape, header_dtype(headers, f"{name}.weight_scale", SCALE_DTYPES))
            if w.format == "int":
                meta = int_description(w.bits, w.group_size, w.symmetric, w.g_idx, shape)
            else:
                meta = {"kind": tensor_kind(w.scheme()), **w.scheme().to_dict(), "shape": list(shape)}
            roles = UNPACKED_ROLES if w.layout in (INT_UNPACKED, FP8_LAYOUT) else self.roles(meta)
            plans[name] = LayerPlan(specs, meta, roles,
                                    lambda t, a=w, shape=shape: decoded(decode(t, a, shape)))
        if not plans:
            raise QuantkitError("compressed-tensors config targets no linear layer of this model")
        return plans

    def input_quantization(self, qc: dict) -> InputQuantization | None:
        return parse_config(qc)[2]

    def check_activations(self, inputs: InputQuantization) -> None:
        check_activations(inputs)

    def stored_input_scale(self, inputs: InputQuantization) -> tuple[str, bool]:
        return (INPUT_GLOBAL_SCALE, True) if inputs.scheme.format == "nvfp4" else super().stored_input_scale(inputs)

    def check_kv_cache(self, kv: KVCacheQuantization) -> None:
        check_kv_cache(kv)

    def kv_cache(self, qc: dict) -> KVCacheQuantization | None:
        return parse_kv_cache(qc)

    def nbytes(self, meta: dict, shape: tuple[int, int], dtype: torch.dtype) -> int:
        if meta["kind"] == "fp8":
            return specs_bytes(expected_tensors(WeightArgs(8, int(meta["group_size"]), True, False, FP8_FORMAT,
                                                           FP8_LAYOUT, int(meta.get("block_rows", 1))),
                                                shape, torch.float32))
        if meta["kind"] != "int":
            return specs_bytes(FloatQuantizedTensor.expected_tensors(meta, shape))
        args = WeightArgs(int(meta["bits"]), int(meta["group_size"]), bool(meta["symmetric"]), g_idx=False)
        return specs_bytes(expected_tensors(args, shape, _scale_dtype(dtype)))

    def roles(self, meta: dict) -> dict[str, str]:
        if meta["kind"] == "fp8":
            return UNPACKED_ROLES
        return INT_ROLES if meta["kind"] == "int" else FloatQuantizedTensor.roles
