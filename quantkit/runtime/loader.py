"""Loading a checkpoint (quantkit native, GPTQ v1/v2, compressed-tensors pack-quantized).

One verification path serves :func:`load` and :func:`verify` (``quantkit inspect``): :func:`open_checked` checks
the configs and every tensor's name, shape and dtype against the safetensors headers before any data is read;
:meth:`CheckedCheckpoint.plain_tensors` and :meth:`CheckedCheckpoint.layers` then read the data one tensor, one
quantized layer at a time, refuse non-finite values and decode each layer once. :func:`load` builds the model
with QuantLinear layers from what they yield; :func:`verify` reads and drops it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from quantkit.actquant import INPUT_SCALE, InputQuantization, StaticActivations
from quantkit.config_fields import check_type, field, read_json
from quantkit.errors import QuantkitError
from quantkit.export.safetensors_io import TensorReader
from quantkit.export.writer import plain_tensors
from quantkit.formats.base import TensorSpec
from quantkit.formats.kron import TRANSFORM_BUFFERS
from quantkit.kvcache import KVCacheQuantization
from quantkit.kvcache import install as install_kv_cache
from quantkit.layouts import Layout, stored_layout
from quantkit.layouts.base import SAFETENSORS_DTYPES, DecodedLayer, Headers, LayerPlan
from quantkit.layouts.gptq import CONFIG_FILE as GPTQ_CONFIG_FILE
from quantkit.models.architectures import adapter_for
from quantkit.models.skeleton import build_skeleton, checked_shard_map, stored_headers
from quantkit.runtime.kernels import check_backend, default_backend
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme


@dataclass
class CheckpointConfig:
    """A checkpoint's model config (without quantization_config), its quantization config and layout."""

    model: dict
    quantization: dict
    layout: Layout


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
    if qc is None:
        raise QuantkitError(f"{folder} is not a quantkit checkpoint (its config.json has no quantization_config)")
    return CheckpointConfig(config, qc, stored_layout(folder, qc))


def is_quantkit_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a local directory that declares quantization (a ``quantization_config`` of any value in
    its config.json, or GPTQ's quantize_config.json): only :func:`load` may read it, and it refuses what it
    cannot read; a float-model loader would initialise the quantized weights at random. Not a validation."""
    folder = Path(path)
    if (folder / GPTQ_CONFIG_FILE).is_file():
        return True
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("quantization_config") is not None


def _validate(expected: dict[str, TensorSpec], files: dict[str, str], headers: Headers) -> None:
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


def _native_record(checkpoint: CheckpointConfig, key: str, what: str) -> dict | None:
    """The object a native quantization config records under ``key`` (None when absent or not native)."""
    record = checkpoint.quantization.get(key) if checkpoint.layout.name == "native" else None
    if record is not None and not isinstance(record, dict):
        raise QuantkitError(f"corrupt {what} in quantization_config: {record!r} is not an object")
    return record


@dataclass
class OnlineInputs:
    """A transform's run-time part, per layer: online map factor sizes and activation clipping ratios."""

    name: str | None  # the transform's name, when the checkpoint records one
    sizes: dict[str, tuple[int, int]]
    clip: dict[str, float]

    def expected(self, layer: str) -> dict[str, TensorSpec]:
        """The factor tensors stored for ``layer`` (relative names), none when it has no online map."""
        return {name: ((size, size), torch.float32) for name, size in zip(TRANSFORM_BUFFERS, self.sizes.get(layer, ()))}


def _factor_sizes(layer: str, sizes: object) -> tuple[int, int]:
    check_type(sizes, list, f"online transform of {layer}")
    if len(sizes) != 2:
        raise QuantkitError(f"online transform of {layer} is {sizes!r}, expected two factor sizes")
    n1, n2 = (check_type(n, int, f"online transform factor of {layer}") for n in sizes)
    return n1, n2


def _online_inputs(checkpoint: CheckpointConfig, plans: dict[str, LayerPlan]) -> OnlineInputs:
    """The transform record of a native checkpoint, validated against its quantized layers."""
    record = _native_record(checkpoint, "transform", "transform record")
    if record is None:
        return OnlineInputs(None, {}, {})
    try:
        name = field(record, "name", str, None)
        sizes = {layer: _factor_sizes(layer, n) for layer, n in field(record, "online", dict, {}).items()}
        clips = {layer: check_type(r, float, f"activation clipping ratio of {layer}")
                 for layer, r in field(record, "activation_clip", dict, {}).items()}
    except QuantkitError as exc:
        raise QuantkitError(f"corrupt transform record in quantization_config: {exc}") from None
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
    return OnlineInputs(name, sizes, clips)


@contextmanager
def _naming(layer: str):
    """Prefix the layer's name to a decoding error."""
    try:
        yield
    except QuantkitError as exc:
        raise QuantkitError(f"{layer}: {exc}") from None


@dataclass
class CheckedCheckpoint:
    """A checkpoint whose configs, tensor names, shapes and dtypes are checked (:func:`open_checked`); its data is
    checked as :meth:`plain_tensors` and :meth:`layers` read it."""

    folder: Path
    config: CheckpointConfig
    files: dict[str, str]  # tensor name -> shard file
    headers: Headers
    model: nn.Module  # the skeleton, parameters on the meta device
    plans: dict[str, LayerPlan]
    inputs: InputQuantization | None
    online: OnlineInputs
    plain: list[str]  # stored tensors kept as they are (embeddings, norms, biases, KV-cache scales, ...)
    kv_cache: KVCacheQuantization | None = None

    @property
    def input_scheme(self) -> QuantScheme | None:
        """The scheme the quantized layers' inputs are quantized with (None: weight-only)."""
        return None if self.inputs is None else self.inputs.scheme

    @property
    def input_static(self) -> StaticActivations | None:
        """The static activation scales' description (None: none stored)."""
        return None if self.inputs is None else self.inputs.static

    def layer_buffers(self, layer: str) -> dict[str, TensorSpec]:
        """What ``layer`` stores besides its weight's tensors (relative names): its online map's factors and
        its static activation scale."""
        specs = self.online.expected(layer)
        if self.input_static is not None:
            name, _ = self.config.layout.stored_input_scale(self.inputs)
            specs[name] = (self.input_static.scale_shape(self.plans[layer].meta["shape"][1]), torch.float32)
        return specs

    @staticmethod
    def check(name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` (stored as ``name``), refused when it holds NaN or infinite values."""
        if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
            raise QuantkitError(f"tensor {name} contains NaN or infinite values")
        return tensor

    def plain_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every plain tensor, read and checked one at a time."""
        with TensorReader(self.folder, self.files) as read:
            for name in self.plain:
                yield name, self.check(name, read(name))

    def stored_names(self, layer: str) -> list[str]:
        """The tensors stored for a quantized layer (relative names): its own and its online factors."""
        return [*self.plans[layer].specs, *self.layer_buffers(layer)]

    def decode(self, layer: str, stored: dict[str, torch.Tensor]) -> tuple[DecodedLayer, dict[str, torch.Tensor]]:
        """A quantized layer's ``stored`` tensors (:meth:`stored_names`) checked, then decoded once (which refuses
        invalid stored values) into the in-memory quantized tensor and a QuantLinear's meta and buffers; with
        its :meth:`layer_buffers`, a static scale checked positive."""
        stored = {name: self.check(f"{layer}.{name}", tensor) for name, tensor in stored.items()}
        plan = self.plans[layer]
        with _naming(layer):
            decoded = plan.decode({name: stored.pop(name) for name in plan.specs})
        if self.input_static is not None:
            name, reciprocal = self.config.layout.stored_input_scale(self.inputs)
            scale = stored.pop(name)
            if not (scale > 0).all():
                raise QuantkitError(f"tensor {layer}.{name} holds a scale that is not positive")
            stored[INPUT_SCALE] = 1 / scale if reciprocal else scale
        return decoded, stored

    def layers(self) -> Iterator[tuple[str, DecodedLayer, dict[str, torch.Tensor]]]:
        """``(layer, decoded, layer buffers)`` of every quantized layer, one at a time, read and :meth:`decode`d."""
        with TensorReader(self.folder, self.files) as read:
            for layer in self.plans:
                yield layer, *self.decode(layer, {name: read(f"{layer}.{name}") for name in self.stored_names(layer)})


def open_checked(path: str | Path) -> CheckedCheckpoint:
    """Open a checkpoint for reading: configs, the model skeleton, the per-layer plans and every stored tensor's
    name, shape and dtype checked against what they require, before any tensor data is read."""
    folder = Path(path)
    checkpoint = open_checkpoint(folder)
    files = checked_shard_map(folder)
    headers = stored_headers(folder, files)
    model = build_skeleton(folder, checkpoint.model, headers)
    plans = checkpoint.layout.plan(model, checkpoint.quantization, headers)
    kv = checkpoint.layout.kv_cache(checkpoint.quantization)
    if kv is not None:  # the attention modules' scale buffers become plain tensors the checkpoint must hold
        install_kv_cache(model, adapter_for(str(checkpoint.model.get("model_type"))), kv)
    inputs = checkpoint.layout.input_quantization(checkpoint.quantization)
    online = _online_inputs(checkpoint, plans)
    plain = {n: (tuple(t.shape), t.dtype) for n, t in plain_tensors(model, plans).items()}
    checked = CheckedCheckpoint(folder, checkpoint, files, headers, model, plans, inputs, online, list(plain), kv)
    expected = {**plain, **checkpoint.layout.extra_specs(checkpoint.quantization, plans)}
    for layer, plan in plans.items():
        expected.update({f"{layer}.{name}": spec for name, spec in {**plan.specs, **checked.layer_buffers(layer)}.items()})
    _validate(expected, files, headers)
    return checked


def verify(path: str | Path) -> CheckedCheckpoint:
    """Every check :func:`load` makes (configs, headers, data, finite values, each layer decoded once), holding
    one layer at a time and building no model; the checked checkpoint, for a description."""
    checked = open_checked(path)
    for _ in checked.plain_tensors():
        pass
    for _ in checked.layers():
        pass
    return checked


def replace_linear(model: nn.Module, layer: str, meta: dict, kernel: str,
                   checked: CheckedCheckpoint) -> tuple[QuantLinear, torch.dtype]:
    """Put in place of ``model``'s linear ``layer`` a QuantLinear of tensor ``meta`` served by ``kernel``, with the
    checkpoint's activation quantization and online input map for it, its tensors on the meta device; with the
    linear's dtype, the activations' its kernel is prepared for."""
    parent, _, child = layer.rpartition(".")
    linear = model.get_submodule(layer)
    quant = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None, meta, linear.weight.dtype,
                        backend=kernel, input_scheme=checked.input_scheme, input_transform=checked.online.sizes.get(layer),
                        input_clip=checked.online.clip.get(layer, 1.0), input_static=checked.input_static)
    setattr(model.get_submodule(parent), child, quant)
    return quant, linear.weight.dtype


def load(path: str | Path, kernel: str | None = None) -> nn.Module:
    """Load a checkpoint as a transformers model whose quantized linears are QuantLinear modules.

    ``kernel`` names the backend that serves them (``auto``, ``cpu``, ``aten``, ``triton`` or ``dequant``;
    default ``$QUANTKIT_KERNEL`` or ``auto``, see :mod:`quantkit.runtime.kernels`).
    """
    kernel = check_backend(kernel) if kernel is not None else default_backend()
    checked = open_checked(path)
    model = checked.model
    for layer, decoded, factors in checked.layers():
        quant, dtype = replace_linear(model, layer, decoded.meta, kernel, checked)
        quant.load_state_dict({**decoded.buffers, **factors}, strict=False, assign=True)
        quant.prepare(decoded.quantized, dtype)
    model.load_state_dict(dict(checked.plain_tensors()), strict=False, assign=True)
    model.tie_weights()
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise QuantkitError(f"checkpoint left {leftover[0]} without a value")
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """The tokenizer saved next to a checkpoint."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
