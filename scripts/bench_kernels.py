#!/usr/bin/env python
"""Kernel benchmark: time per call of dense and quantized linears on CPU, bytes moved, GB/s, speed-up.

Shapes: Llama-7B's (4096x4096, 4096->11008, 11008->4096) and SmolLM2-135M's (576x576, 576->192, 576->1536,
1536->576); batches M=1 (decode) and M=128/512 (prefill). Paths: fp32 dense, bf16 dense, then each
quantized layout through QuantLinear with a named backend (``cpu``: quantkit's C kernels, integer and FP4; ``aten``: torch's
int4/int8 weight-only kernels; ``dequant``: the reference). Each figure is the median of many calls after
warm-up, the paths timed round-robin so that drifts in this machine's speed hit them alike. Calls rotate over enough copies of each layer to fill 96 MiB (three times this machine's L3), so
weights come from memory as they do when decoding a whole model; ``--hot`` reuses one copy (cache-resident
for small shapes). "bytes" counts what one call must move at least: the stored weight (codes, scales, zeros)
plus the activations in and out; GB/s divides that by the time and is set against this machine's copy
bandwidth (read + write of a 512 MiB buffer, measured here).

    python scripts/bench_kernels.py            # the full table (a few minutes on 2 cores)
    python scripts/bench_kernels.py --quick    # one small shape, few repetitions
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.quantizers import LayerStats, make_quantizer
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme

ROOT = Path(__file__).resolve().parents[1]
COLD_FOOTPRINT_BYTES = 96 * 2**20
SHAPES = {  # name -> (in_features, out_features)
    "llama7b-qkvo 4096->4096": (4096, 4096),
    "llama7b-up 4096->11008": (4096, 11008),
    "llama7b-down 11008->4096": (11008, 4096),
    "smollm2-q 576->576": (576, 576),
    "smollm2-kv 576->192": (576, 192),
    "smollm2-up 576->1536": (576, 1536),
    "smollm2-down 1536->576": (1536, 576),
}
# path name -> (scheme, act-order, backend, activation dtype)
QUANT_PATHS = {
    "int4 g64 sym / cpu": (QuantScheme(4, 64, True), False, "cpu", torch.float32),
    "int4 g64 asym act-order / cpu": (QuantScheme(4, 64, False), True, "cpu", torch.float32),
    "int4 g64 sym / aten bf16": (QuantScheme(4, 64, True), False, "aten", torch.bfloat16),
    "int4 per-channel sym / cpu": (QuantScheme(4, -1, True), False, "cpu", torch.float32),
    "int8 per-channel sym / cpu": (QuantScheme(8, -1, True), False, "cpu", torch.float32),
    "int8 g128 asym / cpu": (QuantScheme(8, 128, False), False, "cpu", torch.float32),
    "int8 per-channel sym / aten bf16": (QuantScheme(8, -1, True), False, "aten", torch.bfloat16),
    "int4 g64 sym / dequant": (QuantScheme(4, 64, True), False, "dequant", torch.float32),
    "nvfp4 / cpu": (QuantScheme(4, 16, True, "nvfp4"), False, "cpu", torch.float32),
    "mxfp4 / cpu": (QuantScheme(4, 32, True, "mxfp4"), False, "cpu", torch.float32),
}


def interleaved_medians(calls: dict[str, tuple], budget_s: float, max_rounds: int) -> dict[str, float]:
    """Median wall time of each ``(call, warm-up count)``, timed round-robin (one call of each per round).

    Interleaving spreads this machine's slow drifts in speed over every path alike, instead of favouring
    whichever path ran in a fast spell.
    """
    for call, warmup in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < 5 or time.perf_counter() - start < budget_s):
        for name, (call, _) in calls.items():
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def copy_bandwidth_gbs() -> float:
    """Read + write bandwidth of copying a 512 MiB float32 buffer into another (already touched) one."""
    src = torch.ones(128 * 2**20)
    dst = torch.zeros_like(src)
    seconds = interleaved_medians({"copy": (lambda: dst.copy_(src), 3)}, budget_s=2.0, max_rounds=20)["copy"]
    return 2 * src.numel() * 4 / seconds / 1e9


def quantized_layer(in_features: int, out_features: int, scheme: QuantScheme, act_order: bool, backend: str) -> QuantLinear:
    """A QuantLinear holding random codes (speed does not depend on their values); FP4 layers round a random
    weight, since their scales must be valid encodings."""
    if scheme.is_float:
        qt = make_quantizer("rtn").quantize(torch.randn(out_features, in_features) * 0.02, LayerStats(), scheme)
    else:
        size = in_features if scheme.group_size == -1 else scheme.group_size
        groups = scheme.num_groups(in_features)
        g_idx = None
        if act_order:
            g_idx = torch.empty(in_features, dtype=torch.int32)
            g_idx[torch.randperm(in_features)] = (torch.arange(in_features) // size).to(torch.int32)
        qt = IntQuantizedTensor(
            codes=torch.randint(0, 2**scheme.bits, (out_features, in_features), dtype=torch.uint8),
            scales=(torch.rand(out_features, groups) * 0.01 + 1e-3).half(),
            zeros=torch.randint(0, 2**scheme.bits, (out_features, groups), dtype=torch.uint8),
            scheme=scheme,
            g_idx=g_idx,
        )
    layer = QuantLinear(in_features, out_features, False, qt.meta(), torch.float32, backend=backend)
    for name, tensor in qt.to_tensors().items():
        setattr(layer, name, tensor)
    return layer


def stored_bytes(layer: QuantLinear) -> int:
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in layer.tensor_names)


def rotating(make, weight_bytes: int, cold: bool):
    """``(call, copies)``: a callable cycling over enough copies made by ``make()`` to exceed the caches."""
    copies = [make() for _ in range(max(1, COLD_FOOTPRINT_BYTES // weight_bytes) if cold else 1)]
    position = 0

    def call(x: torch.Tensor) -> torch.Tensor:
        nonlocal position
        position = (position + 1) % len(copies)
        return copies[position](x)

    return call, len(copies)


def dense_layer(in_features: int, out_features: int, dtype: torch.dtype):
    weight = (torch.randn(out_features, in_features) * 0.02).to(dtype)
    return lambda x: F.linear(x, weight)


def measure(rows_per_call: list[int], shapes: dict[str, tuple[int, int]], budget_s: float, max_runs: int,
            bandwidth: float, cold: bool, console: Console) -> list[dict]:
    results = []
    for shape_name, (in_features, out_features) in shapes.items():
        paths = {}
        for path, dtype in (("fp32 dense", torch.float32), ("bf16 dense", torch.bfloat16)):
            size = in_features * out_features * dtype.itemsize
            paths[path] = (rotating(partial(dense_layer, in_features, out_features, dtype), size, cold), size, dtype)
        for path, (scheme, act_order, backend, dtype) in QUANT_PATHS.items():
            size = stored_bytes(quantized_layer(in_features, out_features, scheme, act_order, backend))
            make = partial(quantized_layer, in_features, out_features, scheme, act_order, backend)
            paths[path] = (rotating(make, size, cold), size, dtype)
        for rows in rows_per_call:
            # the reference path is only timed for decode; every copy is called once first (QuantLinear
            # builds its kernel on the first call)
            timed = {path: entry for path, entry in paths.items() if rows == 1 or not path.endswith("dequant")}
            inputs = {path: torch.randn(rows, in_features).to(dtype) for path, (_, _, dtype) in timed.items()}
            calls = {path: (partial(call, inputs[path]), copies + 3) for path, ((call, copies), _, _) in timed.items()}
            with torch.inference_mode():
                seconds = interleaved_medians(calls, budget_s, max_runs)
            for path, (_, weight_bytes, _) in timed.items():
                moved = weight_bytes + (in_features + out_features) * rows * inputs[path].element_size()
                row = {"shape": shape_name, "M": rows, "path": path, "ms": seconds[path] * 1e3, "bytes": moved,
                       "GB/s": moved / seconds[path] / 1e9, "fraction_of_copy_bw": moved / seconds[path] / 1e9 / bandwidth,
                       "speedup_vs_fp32": seconds["fp32 dense"] / seconds[path]}
                results.append(row)
                console.log(f"{shape_name} M={rows} {path}: {row['ms']:.3f} ms, x{row['speedup_vs_fp32']:.2f}")
    return results


def render(results: list[dict], bandwidth: float, cold: bool, console: Console) -> None:
    table = Table(title=f"CPU linear kernels, {'cold' if cold else 'hot'} cache (copy bandwidth {bandwidth:.1f} GB/s, "
                        f"{torch.get_num_threads()} threads)")
    for column in ("shape", "M", "path", "ms/call", "MB moved", "GB/s", "% copy bw", "vs fp32"):
        table.add_column(column, justify="left" if column in ("shape", "path") else "right")
    for r in results:
        table.add_row(r["shape"], str(r["M"]), r["path"], f"{r['ms']:.3f}", f"{r['bytes'] / 1e6:.1f}",
                      f"{r['GB/s']:.1f}", f"{100 * r['fraction_of_copy_bw']:.0f}", f"{r['speedup_vs_fp32']:.2f}x")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repetitions")
    parser.add_argument("--hot", action="store_true", help="reuse one copy of each layer (cache-resident when small)")
    parser.add_argument("--shapes", help="comma list of shape names (or their first word) to run, e.g. llama7b-up")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_kernels" / "bench_kernels.json")
    args = parser.parse_args()
    console = Console(width=150)
    torch.manual_seed(0)
    if args.quick:
        shapes, rows, budget, max_runs = {k: v for k, v in SHAPES.items() if k.startswith("smollm2-up")}, [1, 128], 1.0, 20
    else:
        shapes, rows, budget, max_runs = SHAPES, [1, 128, 512], 10.0, 200
    if args.shapes:
        wanted = [w.strip() for w in args.shapes.split(",") if w.strip()]
        shapes = {k: v for k, v in SHAPES.items() if any(k == w or k.split()[0] == w for w in wanted)}
        if not shapes:
            raise SystemExit(f"no shape matches {args.shapes!r}; known: {', '.join(s.split()[0] for s in SHAPES)}")
    bandwidth = copy_bandwidth_gbs()
    console.log(f"copy bandwidth {bandwidth:.2f} GB/s")
    results = measure(rows, shapes, budget, max_runs, bandwidth, not args.hot, console)
    render(results, bandwidth, not args.hot, console)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"copy_bandwidth_gbs": bandwidth, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cache": "hot" if args.hot else "cold", "results": results}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    console.log(f"saved {args.output}")


if __name__ == "__main__":
    main()
