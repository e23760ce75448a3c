"""Loading a checkpoint (quantkit native, GPTQ v1/v2, compressed-tensors pack-quantized): validate every
tensor against the config from the safetensors headers, then build the model with QuantLinear layers."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.actquant import activation_scheme
from quantkit.errors import QuantkitError
from quantkit.export import compressed_tensors_format as ct
from quantkit.export.gptq_format import CONFIG_FILE as GPTQ_CONFIG_FILE
from quantkit.export.native import FORMAT_NAME, FORMAT_VERSION, QUANT_METHOD
from quantkit.export.safetensors_io import (
    INDEX_FILE,
    SAFETENSORS_DTYPES,
    SINGLE_FILE,
    header_specs,
    read_tensors,
    shard_map,
)
from quantkit.export.writer import plain_tensors
from quantkit.formats.base import TensorSpec
from quantkit.models.adapters import adapter_for
from quantkit.runtime import readers
from quantkit.runtime.kernels import check_backend, default_backend
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme
from quantkit.transforms.kron import TRANSFORM_BUFFERS

_PLANNERS = {
    "native": readers.native_plans,
    "gptq": readers.gptq_plans,
    "compressed-tensors": readers.compressed_tensors_plans,
}


@dataclass
class CheckpointConfig:
    """A checkpoint's model config (without quantization_config), its quantization config and format name."""

    model: dict
    quantization: dict
    format: str


def _format_of(qc: object) -> str | None:
    if not isinstance(qc, dict):
        return None
    method = qc.get("quant_method")
    if method == QUANT_METHOD:
        return "native"
    if method == "gptq":
        return "gptq"
    if method == ct.QUANT_METHOD:
        return "compressed-tensors"
    return None


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise QuantkitError(f"corrupt {what} in {path.parent}: {exc}") from None
    if not isinstance(data, dict):
        raise QuantkitError(f"corrupt {what} in {path.parent}: not a JSON object")
    return data


def open_checkpoint(folder: Path) -> CheckpointConfig:
    """Read and check the configs of any checkpoint quantkit can load."""
    if not folder.is_dir():
        raise QuantkitError(f"checkpoint not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise QuantkitError(f"{folder} is not a checkpoint: no config.json")
    config = read_json(path, "config.json")
    qc = config.pop("quantization_config", None)
    if qc is None and (folder / GPTQ_CONFIG_FILE).is_file():
        qc = read_json(folder / GPTQ_CONFIG_FILE, GPTQ_CONFIG_FILE)
        qc.setdefault("quant_method", "gptq")
    fmt = _format_of(qc)
    if fmt is None:
        raise QuantkitError(
            f"{folder} is not a quantkit checkpoint (config.json has no quantkit, GPTQ or compressed-tensors "
            "quantization_config)"
        )
    if fmt == "native":
        version = qc.get("format_version", 0)
        if qc.get("format") != FORMAT_NAME or type(version) is not int or version > FORMAT_VERSION:
            raise QuantkitError(f"unsupported checkpoint format {qc.get('format')} v{qc.get('format_version')}")
        if not isinstance(qc.get("layers"), dict):
            raise QuantkitError(f"corrupt quantization_config in {folder}: no per-layer table")
    return CheckpointConfig(config, qc, fmt)


def is_quantkit_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` claims to be a checkpoint quantkit loads (native, GPTQ or compressed-tensors); not a validation."""
    try:
        open_checkpoint(Path(path))
    except QuantkitError:
        return False
    return True


_BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")
_JSON_KINDS = ((bool, "true or false"), (int, "an integer"), (float, "a number"), (str, "a string"),
               (list, "a list"), (dict, "an object"))


def _check_config_types(config_dict: dict, defaults: dict) -> None:
    """Refuse a config field whose JSON type differs from the architecture's default for it (transformers
    accepts any value and fails later, deep in a forward pass)."""
    for key, value in config_dict.items():
        default = defaults.get(key)
        if default is None or (value is None and key.endswith("_token_id")):  # models may lack a special token
            continue
        kind, words = next((k, w) for k, w in _JSON_KINDS if isinstance(default, k))
        fits = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            fits = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not fits:
            raise QuantkitError(f"invalid model config in checkpoint: {key} is {value!r}, expected {words}")


def _check_depth(config_dict: dict, tensor_names: Iterable[str]) -> None:
    """The config's block count must be the checkpoint's, checked before any module is built (a lying count
    would otherwise build millions of empty blocks)."""
    stored = {int(match.group(1)) for name in tensor_names if (match := _BLOCK_INDEX.search(name))}
    declared = config_dict.get("num_hidden_layers")
    if declared != len(stored) or stored != set(range(len(stored))):
        raise QuantkitError(f"invalid model config in checkpoint: num_hidden_layers is {declared!r} but the "
                            f"weights hold {len(stored)} blocks")


def build_skeleton(config_dict: dict, tensor_names: Iterable[str], dtype: torch.dtype | None = None) -> nn.Module:
    """The model ``config_dict`` describes, with its parameters on the meta device (``dtype``: default the
    config's), after checking the config's field types and its block count against ``tensor_names``."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config_dict.get("model_type")
    adapter_for(str(model_type))
    _check_config_types(config_dict, AutoConfig.for_model(str(model_type)).to_dict())
    _check_depth(config_dict, tensor_names)
    try:
        config = AutoConfig.for_model(**config_dict)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - transformers validates configs with several exception types
        raise QuantkitError(f"invalid model config in checkpoint: {' '.join(str(exc).split()) or type(exc).__name__}") from None
    model.tie_weights()  # empty-weight construction skips tying; tied tensors are stored once
    return model


def checked_shard_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file of a safetensors directory; a directory of pickle weights is refused."""
    if not (folder / SINGLE_FILE).is_file() and not (folder / INDEX_FILE).is_file():
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        if pickled:
            raise QuantkitError(f"{folder} holds pickle weights ({pickled[0]}); quantkit loads only safetensors")
    return shard_map(folder)


def _headers(folder: Path, files: dict[str, str]) -> readers.Headers:
    specs: readers.Headers = {}
    for shard in sorted(set(files.values())):
        specs.update(header_specs(folder / shard))
    return specs


def _plans(model: nn.Module, checkpoint: CheckpointConfig, headers: readers.Headers) -> dict[str, readers.LayerPlan]:
    return _PLANNERS[checkpoint.format](model, checkpoint.quantization, headers)


def _expected(model: nn.Module, plans: dict[str, readers.LayerPlan]) -> dict[str, TensorSpec]:
    expected: dict[str, TensorSpec] = {n: (tuple(t.shape), t.dtype) for n, t in plain_tensors(model, plans).items()}
    for layer, plan in plans.items():
        expected.update({f"{layer}.{name}": spec for name, spec in plan.specs.items()})
    return expected


def _validate(expected: dict[str, TensorSpec], files: dict[str, str], headers: readers.Headers) -> None:
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise QuantkitError(f"checkpoint is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if unexpected:
        raise QuantkitError(f"checkpoint has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    for name, (shape, dtype) in expected.items():
        if name not in headers:
            raise QuantkitError(f"tensor {name} is not in {files[name]} although the index says so")
        want = (tuple(shape), SAFETENSORS_DTYPES.get(dtype, str(dtype)))
        if headers[name] != want:
            got_shape, got_dtype = headers[name]
            raise QuantkitError(f"tensor {name} has shape {list(got_shape)} {got_dtype}, expected {list(want[0])} {want[1]}")


def _input_scheme(checkpoint: CheckpointConfig) -> QuantScheme | None:
    """The activation quantization a native checkpoint records, validated."""
    recorded = checkpoint.quantization.get("input_activations") if checkpoint.format == "native" else None
    if recorded is None:
        return None
    try:
        return activation_scheme(int(recorded["bits"]), str(recorded["format"]), int(recorded["group_size"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise QuantkitError(f"corrupt input_activations in quantization_config: {exc!r}") from None


@dataclass
class OnlineInputs:
    """A transform's run-time part, per layer: online map factor sizes and activation clipping ratios."""

    sizes: dict[str, tuple[int, int]]
    clip: dict[str, float]

    def expected(self) -> dict[str, TensorSpec]:
        return {f"{layer}.{name}": ((size, size), torch.float32)
                for layer, sizes in self.sizes.items() for name, size in zip(TRANSFORM_BUFFERS, sizes)}


def _online_inputs(checkpoint: CheckpointConfig, plans: dict[str, readers.LayerPlan]) -> OnlineInputs:
    """The transform record of a native checkpoint, validated against its quantized layers."""
    record = checkpoint.quantization.get("transform") if checkpoint.format == "native" else None
    if record is None:
        return OnlineInputs({}, {})
    try:
        sizes = {layer: (int(n1), int(n2)) for layer, (n1, n2) in record.get("online", {}).items()}
        clips = {layer: float(r) for layer, r in record.get("activation_clip", {}).items()}
    except (AttributeError, TypeError, ValueError) as exc:
        raise QuantkitError(f"corrupt transform record in quantization_config: {exc!r}") from None
    for layer in [*sizes, *clips]:
        if layer not in plans:
            raise QuantkitError(f"transform record names {layer}, which is not a quantized layer")
    for layer, (n1, n2) in sizes.items():
        if n1 < 1 or n2 < 1 or n1 * n2 != plans[layer].meta["shape"][1]:
            raise QuantkitError(f"online transform of {layer} has factors {n1}x{n2}, which do not match its "
                                f"{plans[layer].meta['shape'][1]} inputs")
    for layer, ratio in clips.items():
        if not 0 < ratio <= 1:
            raise QuantkitError(f"activation clipping ratio of {layer} is {ratio}, outside (0, 1]")
    return OnlineInputs(sizes, clips)


def _quant_linear(name: str, linear: nn.Linear, meta: dict, kernel: str, input_scheme: QuantScheme | None,
                  online: OnlineInputs) -> QuantLinear:
    try:
        return QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, meta, linear.weight.dtype,
                           backend=kernel, input_scheme=input_scheme, input_transform=online.sizes.get(name),
                           input_clip=online.clip.get(name, 1.0))
    except (KeyError, TypeError, ValueError) as exc:
        raise QuantkitError(f"checkpoint entry for {name} is incomplete or invalid: {exc!r}") from None


def describe_layers(path: str | Path) -> tuple[CheckpointConfig, dict[str, dict]]:
    """The checkpoint's configs and a native-style meta (with shape) per quantized layer, from headers only."""
    folder = Path(path)
    checkpoint = open_checkpoint(folder)
    if checkpoint.format == "native":
        return checkpoint, checkpoint.quantization["layers"]
    headers = _headers(folder, checked_shard_map(folder))
    model = build_skeleton(checkpoint.model, headers)
    plans = _plans(model, checkpoint, headers)
    return checkpoint, {name: plan.meta for name, plan in plans.items()}


@contextmanager
def _naming(layer: str):
    """Prefix the layer's name to a decoding error."""
    try:
        yield
    except QuantkitError as exc:
        raise QuantkitError(f"{layer}: {exc}") from None


def load(path: str | Path, kernel: str | None = None) -> nn.Module:
    """Load a checkpoint as a transformers model whose quantized linears are QuantLinear modules.

    ``kernel`` names the backend that serves them (``auto``, ``cpu``, ``aten``, ``triton`` or ``dequant``;
    default ``$QUANTKIT_KERNEL`` or ``auto``, see :mod:`quantkit.runtime.kernels`).
    """
    kernel = check_backend(kernel) if kernel is not None else default_backend()
    folder = Path(path)
    checkpoint = open_checkpoint(folder)
    files = checked_shard_map(folder)
    headers = _headers(folder, files)
    model = build_skeleton(checkpoint.model, headers)
    plans = _plans(model, checkpoint, headers)
    input_scheme = _input_scheme(checkpoint)
    online = _online_inputs(checkpoint, plans)
    _validate({**_expected(model, plans), **online.expected()}, files, headers)
    tensors = read_tensors(folder, files)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
            raise QuantkitError(f"tensor {name} contains NaN or infinite values")
    for layer, plan in plans.items():
        with _naming(layer):
            meta, buffers = plan.decode({name: tensors.pop(f"{layer}.{name}") for name in plan.specs})
        parent, _, child = layer.rpartition(".")
        setattr(model.get_submodule(parent), child, _quant_linear(layer, model.get_submodule(layer), meta, kernel, input_scheme,
                                                                    online))
        tensors.update({f"{layer}.{name}": t for name, t in buffers.items()})
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise QuantkitError(f"checkpoint left {leftover[0]} without a value")
    if checkpoint.format == "native":  # imported layers were decoded (and their g_idx checked) by their reader
        for layer in plans:
            with _naming(layer):
                model.get_submodule(layer).quantized()  # decode once: refuses invalid stored values early
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """The tokenizer saved next to a checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
