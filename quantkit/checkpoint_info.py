"""What is in a checkpoint: schemes, sizes and bits per weight, read from headers without loading tensors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.export.safetensors_io import DTYPE_BYTES, header_specs, shard_map
from quantkit.runtime.loader import describe_layers
from quantkit.transforms.kron import TRANSFORM_BUFFERS

ROLES = ("codes", "statistics", "outliers", "permutation", "transform", "other")


def tensor_role(name: str) -> str:
    """What a quantized layer's stored tensor holds, from its name (native, GPTQ and compressed-tensors names)."""
    if "outlier" in name:
        return "outliers"
    if name in TRANSFORM_BUFFERS:
        return "transform"
    if "g_idx" in name or name == "perm":
        return "permutation"
    if "scale" in name or "zero" in name:
        return "statistics"
    if name in ("qweight", "weight_packed"):
        return "codes"
    return "other"


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


def scheme_label(meta: dict) -> str:
    """A short name such as ``int w4 g64 sym act-order`` or ``nvfp4 g16``."""
    group = "per-channel" if meta.get("group_size") == -1 else f"g{meta.get('group_size')}"
    if meta.get("kind") == "e2m1":
        return f"{meta.get('format')} {group}"
    parts = [meta.get("kind", "?"), f"w{meta.get('bits')}", group, "sym" if meta.get("symmetric") else "asym"]
    if meta.get("kind") == "spqr":
        parts.append(f"stats {meta.get('stat_bits')}b/{meta.get('stat_group_size')} rows")
    if meta.get("act_order") or meta.get("permuted"):
        parts.append("act-order")
    return " ".join(parts)


def inspect_checkpoint(path: str | Path) -> CheckpointInfo:
    folder = Path(path)
    checkpoint, layers = describe_layers(folder)
    config, qc = checkpoint.model, checkpoint.quantization
    files = shard_map(folder)
    specs = {}
    for shard in sorted(set(files.values())):
        specs.update(header_specs(folder / shard))
    unknown = sorted(name for name, (_, dtype) in specs.items() if dtype not in DTYPE_BYTES)
    if unknown:
        raise QuantkitError(f"tensor {unknown[0]} has unsupported dtype {specs[unknown[0]][1]}")
    nbytes = {name: math.prod(shape) * DTYPE_BYTES[dtype] for name, (shape, dtype) in specs.items()}
    numel = {name: math.prod(shape) for name, (shape, _) in specs.items()}
    by_scheme: dict[str, SchemeSummary] = {}
    total = SchemeSummary("all quantized layers")
    owned: set[str] = set()
    for layer, meta in layers.items():
        tensors = [n for n in specs if n.startswith(f"{layer}.") and n != f"{layer}.bias"]
        owned.update(tensors)
        summary = SchemeSummary(scheme_label(meta), 1, math.prod(meta.get("shape", [0, 0])),
                                sum(nbytes[n] for n in tensors), int(meta.get("outliers", 0)))
        for name in tensors:
            summary.role_bytes[tensor_role(name.removeprefix(f"{layer}."))] += nbytes[name]
        by_scheme.setdefault(summary.scheme, SchemeSummary(summary.scheme)).add(summary)
        total.add(summary)
    others = [n for n in specs if n not in owned]
    return CheckpointInfo(
        path=str(folder),
        method=str(qc.get("method") or qc.get("quant_method")),
        model_type=str(config.get("model_type")),
        schemes=list(by_scheme.values()),
        total=total,
        other_params=sum(numel[n] for n in others),
        other_bytes=sum(nbytes[n] for n in others),
        file_bytes=sum((folder / f).stat().st_size for f in set(files.values())),
        quantization_config={k: v for k, v in qc.items() if k != "layers"},
        layer_bits={layer: int(meta.get("bits", 0)) for layer, meta in layers.items()},
    )
