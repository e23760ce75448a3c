"""What is in a checkpoint: schemes (weights, activations, online transforms), sizes and bits per weight, described
after the runtime's full verification (:func:`quantkit.runtime.loader.verify`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.actquant import StaticActivations
from quantkit.errors import QuantkitError
from quantkit.formats.base import ROLES
from quantkit.layouts.base import DTYPE_BYTES
from quantkit.runtime.loader import verify
from quantkit.schemes import GGUF_FORMATS, QuantScheme


@dataclass
class SchemeSummary:
    scheme: str
    layers: int = 0
    weights: int = 0
    bytes: int = 0
    outliers: int = 0
    role_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ROLES, 0))

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights

    def role_bits(self) -> dict[str, float]:
        """Bits per weight spent on each kind of tensor; they add up to :attr:`bits_per_weight`."""
        return {role: 8 * nbytes / self.weights for role, nbytes in self.role_bytes.items()}

    def add(self, other: SchemeSummary) -> None:
        self.layers += other.layers
        self.weights += other.weights
        self.bytes += other.bytes
        self.outliers += other.outliers
        for role, nbytes in other.role_bytes.items():
            self.role_bytes[role] += nbytes


@dataclass
class CheckpointInfo:
    path: str
    method: str
    model_type: str
    schemes: list[SchemeSummary]
    total: SchemeSummary  # every quantized layer together
    other_params: int
    other_bytes: int
    file_bytes: int
    quantization_config: dict
    layer_bits: dict[str, int] = field(default_factory=dict)  # width of every quantized linear
    activations: dict | None = None  # the per-token activation scheme applied after loading, if any
    online_transform: str | None = None  # the transform whose online input maps run after loading, if any

    @property
    def quantized_weights(self) -> int:
        return self.total.weights

    @property
    def quantized_bytes(self) -> int:
        return self.total.bytes

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, counting codes, statistics, outliers and indices as written."""
        return self.total.bits_per_weight if self.total.weights else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        for entry, summary in zip([*data["schemes"], data["total"]], [*self.schemes, self.total]):
            entry["bits_per_weight"] = summary.bits_per_weight if summary.weights else float("nan")
            entry["role_bits"] = summary.role_bits() if summary.weights else {}
            entry["outlier_fraction"] = summary.outliers / summary.weights if summary.weights else 0.0
        data["bits_per_weight"] = self.bits_per_weight
        return data


def weight_label(meta: dict) -> str:
    """A short name of a weight scheme, such as ``int w4 g64 sym act-order``, ``nvfp4 g16`` or ``fp8 128x128 blocks``."""
    group = "per-channel" if meta.get("group_size") == -1 else f"g{meta.get('group_size')}"
    rows = meta.get("block_rows", 1)
    if rows == -1:
        group = "per-tensor" if meta.get("group_size") == -1 else f"{group} over all rows"
    elif rows != 1:
        group = f"{rows}x{'row' if meta.get('group_size') == -1 else meta.get('group_size')} blocks"
    if meta.get("kind") in ("e2m1", "fp8"):
        return f"{meta.get('format')} {group}"
    parts = [meta.get("kind", "?"), f"w{meta.get('bits')}", group, "sym" if meta.get("symmetric") else "asym"]
    if meta.get("kind") == "spqr":
        parts.append(f"stats {meta.get('stat_bits')}b/{meta.get('stat_group_size')} rows")
    if meta.get("act_order") or meta.get("permuted"):
        parts.append("act-order")
    return " ".join(parts)


def activation_label(scheme: QuantScheme, static: StaticActivations | None = None) -> str:
    """A short name of an activation scheme, such as ``a4 nvfp4 g16``, ``a8 int per-token`` or ``a8 fp8 static
    per-tensor``."""
    if static is not None:
        return f"a{scheme.bits} {scheme.format} static per-{static.granularity}"
    return f"a{scheme.bits} {scheme.format} {'per-token' if scheme.group_size == -1 else f'g{scheme.group_size}'}"


def scheme_label(meta: dict, activations: QuantScheme | None = None, online_transform: str | None = None,
                 static: StaticActivations | None = None) -> str:
    """What serves a layer: its weight scheme, then its activation scheme and online input transform, if any,
    e.g. ``int w4 per-channel sym + a4 int per-token + online hadamard``."""
    parts = [weight_label(meta)]
    if activations is not None:
        parts.append(activation_label(activations, static))
    if online_transform is not None:
        parts.append(f"online {online_transform}")
    return " + ".join(parts)


def inspect_gguf(path: Path) -> CheckpointInfo:
    """Describe a GGUF file: its tensors in GGUF's block formats by format (a block's codes and its scales), the
    rest as other tensors."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError):
        raise QuantkitError(f"{path} is neither a checkpoint directory nor a GGUF file") from None
    by_format: dict[str, SchemeSummary] = {}
    total = SchemeSummary("all quantized layers")
    other_params = other_bytes = 0
    for tensor in reader.tensors:
        fmt = tensor.tensor_type.name.lower()
        if fmt not in GGUF_FORMATS:
            other_params, other_bytes = other_params + int(tensor.n_elements), other_bytes + int(tensor.n_bytes)
            continue
        codes = int(tensor.n_elements) * GGUF_FORMATS[fmt][0] // 8
        summary = SchemeSummary(fmt, 1, int(tensor.n_elements), int(tensor.n_bytes))
        summary.role_bytes.update(codes=codes, statistics=int(tensor.n_bytes) - codes)
        by_format.setdefault(fmt, SchemeSummary(fmt)).add(summary)
        total.add(summary)
    field = reader.fields.get("general.architecture")
    return CheckpointInfo(path=str(path), method="gguf", model_type=str(field.contents()) if field else "unknown",
                          schemes=list(by_format.values()), total=total, other_params=other_params,
                          other_bytes=other_bytes, file_bytes=path.stat().st_size,
                          quantization_config={key: read.contents() for key, read in reader.fields.items()
                                               if key.startswith("general.") and len(read.types) == 1})


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    """Describe a checkpoint after every check :func:`quantkit.load` makes (data included); refuses exactly what
    it refuses, with the same message. A ``.gguf`` file is described by :func:`inspect_gguf`."""
    if Path(path).is_file():  # checkpoints are directories; a file is a GGUF file or nothing quantkit reads
        return inspect_gguf(Path(path))
    checked = verify(path)
    config, qc = checked.config.model, checked.config.quantization
    specs = {name: checked.headers[name] for name in checked.files}
    nbytes = {name: math.prod(shape) * DTYPE_BYTES[dtype] for name, (shape, dtype) in specs.items()}
    transform = checked.online.name or "transform"
    by_scheme: dict[str, SchemeSummary] = {}
    total = SchemeSummary("all quantized layers")
    for layer, plan in checked.plans.items():
        roles = {**plan.roles, **dict.fromkeys(checked.online.expected(layer), "transform"),
                 **dict.fromkeys(checked.layer_buffers(layer).keys() - checked.online.expected(layer), "statistics")}
        stored = checked.stored_names(layer)
        meta = plan.meta
        label = scheme_label(meta, checked.input_scheme, transform if layer in checked.online.sizes else None,
                             checked.input_static)
        summary = SchemeSummary(label, 1, math.prod(meta["shape"]), sum(nbytes[f"{layer}.{n}"] for n in stored),
                                int(meta.get("outliers", 0)))
        for name in stored:
            summary.role_bytes[roles[name]] += nbytes[f"{layer}.{name}"]
        by_scheme.setdefault(label, SchemeSummary(label)).add(summary)
        total.add(summary)
    return CheckpointInfo(
        path=str(checked.folder),
        method=str(qc.get("method") or qc.get("quant_method")),
        model_type=str(config.get("model_type")),
        schemes=list(by_scheme.values()),
        total=total,
        other_params=sum(math.prod(specs[n][0]) for n in checked.plain),
        other_bytes=sum(nbytes[n] for n in checked.plain),
        file_bytes=sum((checked.folder / f).stat().st_size for f in set(checked.files.values())),
        quantization_config={k: v for k, v in qc.items() if k != "layers"},
        layer_bits={layer: int(plan.meta.get("bits", 0)) for layer, plan in checked.plans.items()},
        activations=None if checked.inputs is None else {**checked.inputs.record(),
                                                         "label": activation_label(checked.input_scheme, checked.input_static)},
        online_transform=transform if checked.online.sizes else None,
    )
