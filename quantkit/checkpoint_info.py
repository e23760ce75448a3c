"""What is in a checkpoint: schemes, sizes and bits per weight, read from headers without loading tensors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.export.safetensors_io import DTYPE_BYTES, header_specs, shard_map
from quantkit.runtime.loader import describe_layers


@dataclass
class SchemeSummary:
    scheme: str
    layers: int
    weights: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.bytes / self.weights


@dataclass
class CheckpointInfo:
    path: str
    method: str
    model_type: str
    schemes: list[SchemeSummary]
    quantized_weights: int
    quantized_bytes: int
    other_params: int
    other_bytes: int
    file_bytes: int
    quantization_config: dict

    @property
    def bits_per_weight(self) -> float:
        """Bits per quantized weight, counting codes, scales, zeros and indices as written."""
        return 8 * self.quantized_bytes / self.quantized_weights if self.quantized_weights else float("nan")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["bits_per_weight"] = self.bits_per_weight
        for entry, summary in zip(data["schemes"], self.schemes):
            entry["bits_per_weight"] = summary.bits_per_weight
        return data


def scheme_label(meta: dict) -> str:
    """A short name such as ``int w4 g64 sym act-order``."""
    group = "per-channel" if meta.get("group_size") == -1 else f"g{meta.get('group_size')}"
    parts = [meta.get("kind", "?"), f"w{meta.get('bits')}", group, "sym" if meta.get("symmetric") else "asym"]
    if meta.get("act_order"):
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
    owned: set[str] = set()
    for layer, meta in layers.items():
        tensors = [n for n in specs if n.startswith(f"{layer}.") and n != f"{layer}.bias"]
        owned.update(tensors)
        label = scheme_label(meta)
        summary = by_scheme.setdefault(label, SchemeSummary(label, 0, 0, 0))
        summary.layers += 1
        summary.weights += math.prod(meta.get("shape", [0, 0]))
        summary.bytes += sum(nbytes[n] for n in tensors)
    others = [n for n in specs if n not in owned]
    return CheckpointInfo(
        path=str(folder),
        method=str(qc.get("method") or qc.get("quant_method")),
        model_type=str(config.get("model_type")),
        schemes=list(by_scheme.values()),
        quantized_weights=sum(s.weights for s in by_scheme.values()),
        quantized_bytes=sum(s.bytes for s in by_scheme.values()),
        other_params=sum(numel[n] for n in others),
        other_bytes=sum(nbytes[n] for n in others),
        file_bytes=sum((folder / f).stat().st_size for f in set(files.values())),
        quantization_config={k: v for k, v in qc.items() if k != "layers"},
    )
