#!/usr/bin/env python
"""Kernel benchmark: time per call of dense and quantized linears on CPU, bytes moved, GB/s, speed-up.

Shapes: Llama-7B's (4096x4096, 4096->11008, 11008->4096) and SmolLM2-135M's (576x576, 576->192, 576->1536,
1536->576); batches M=1 (decode) and M=128/512 (prefill). Paths: fp32 dense, bf16 dense, then each
quantized layout through QuantLinear with a named backend (``cpu``: quantkit's C kernels, exact; ``cpu-int8``: their
int8-activation decode; ``@avx2``/``@portable``: another build than the best this CPU has; ``aten``: torch's
int4/int8 weight-only kernels; ``dequant``: the reference). The CPU model, its flags and the build chosen are
printed first and saved with the results; "% read bw" sets each path's bytes per second against this machine's
read bandwidth (a sum over 512 MiB). Each figure is the median of many calls after
warm-up, the paths timed round-robin so that drifts in this machine's speed hit them alike. Calls rotate over enough copies of each layer to fill 96 MiB (three times this machine's L3), so
weights come from memory as they do when decoding a whole model; ``--hot`` reuses one copy (cache-resident
for small shapes). "bytes" counts what one call must move at least: the stored weight (codes, scales, zeros)
plus the activations in and out; GB/s divides that by the time and is set against this machine's copy
bandwidth (read + write of a 512 MiB buffer, measured here).

    python scripts/bench_kernels.py            # the full table (about half an hour on 2 cores)
    python scripts/bench_kernels.py --quick    # one small shape, few repetitions
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.spqr import CsrOutliers, SpQRQuantizedTensor, StatCodes
from quantkit.quantizers import LayerStats, make_quantizer
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme
from quantkit_kernels.cpu_isa import ISA_ENV, describe

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
INT4_G64 = QuantScheme(4, 64, True)
SPQR_W3 = QuantScheme(3, 16, False)


@dataclass(frozen=True)
class Path_:
    """One quantized path: the weight's scheme, act-order, the backend, the activation dtype and, when not the
    best this CPU has, the C kernel build (``$QUANTKIT_CPU_ISA``); for SpQR's int8 decode, optionally one part
    of it alone (``"dense"``: codes and statistic records; ``"outliers"``: the sparse correction)."""

    scheme: QuantScheme
    act_order: bool
    backend: str
    dtype: torch.dtype = torch.float32
    isa: str | None = None
    spqr: bool = False
    spqr_part: str = ""


QUANT_PATHS = {
    "int4 g64 sym / cpu": Path_(INT4_G64, False, "cpu"),
    "int4 g64 sym / cpu-int8": Path_(INT4_G64, False, "cpu-int8"),
    "int4 g64 sym / cpu @avx2": Path_(INT4_G64, False, "cpu", isa="avx2"),
    "int4 g64 sym / cpu-int8 @avx2": Path_(INT4_G64, False, "cpu-int8", isa="avx2"),
    "int4 g64 sym / cpu @portable": Path_(INT4_G64, False, "cpu", isa="portable"),
    "int4 per-channel sym / cpu-int8": Path_(QuantScheme(4, -1, True), False, "cpu-int8"),
    "int4 g32 asym / cpu-int8": Path_(QuantScheme(4, 32, False), False, "cpu-int8"),
    "int4 g128 sym / cpu-int8": Path_(QuantScheme(4, 128, True), False, "cpu-int8"),
    "int4 g64 asym act-order / cpu-int8": Path_(QuantScheme(4, 64, False), True, "cpu-int8"),
    "spqr w3 g16 / cpu-int8": Path_(SPQR_W3, True, "cpu-int8", spqr=True),
    "spqr w3 g16 / cpu": Path_(SPQR_W3, True, "cpu", spqr=True),
    "spqr w3 g16 / cpu-int8 dense part": Path_(SPQR_W3, True, "cpu-int8", spqr=True, spqr_part="dense"),
    "spqr w3 g16 / cpu-int8 outliers part": Path_(SPQR_W3, True, "cpu-int8", spqr=True, spqr_part="outliers"),
    "int4 g64 sym / aten fp32": Path_(INT4_G64, False, "aten"),
    "int4 g64 sym / aten bf16": Path_(INT4_G64, False, "aten", torch.bfloat16),
    "int8 per-channel sym / cpu": Path_(QuantScheme(8, -1, True), False, "cpu"),
    "int8 per-channel sym / cpu-int8": Path_(QuantScheme(8, -1, True), False, "cpu-int8"),
    "int8 per-channel sym / aten bf16": Path_(QuantScheme(8, -1, True), False, "aten", torch.bfloat16),
    "int4 g64 sym / dequant": Path_(INT4_G64, False, "dequant"),
    "nvfp4 / cpu": Path_(QuantScheme(4, 16, True, "nvfp4"), False, "cpu"),
    "mxfp4 / cpu": Path_(QuantScheme(4, 32, True, "mxfp4"), False, "cpu"),
    "nvfp4 / cpu-int8": Path_(QuantScheme(4, 16, True, "nvfp4"), False, "cpu-int8"),
    "mxfp4 / cpu-int8": Path_(QuantScheme(4, 32, True, "mxfp4"), False, "cpu-int8"),
    "nvfp4 / cpu-int8 @avx2": Path_(QuantScheme(4, 16, True, "nvfp4"), False, "cpu-int8", isa="avx2"),
}


@contextmanager
def isa_override(isa: str | None) -> Iterator[None]:
    """``$QUANTKIT_CPU_ISA`` set to ``isa`` (when given) while kernels are built."""
    before = os.environ.get(ISA_ENV)
    if isa is not None:
        os.environ[ISA_ENV] = isa
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = before


def interleaved_medians(calls: dict[str, tuple], budget_s: float, max_rounds: int) -> dict[str, float]:
    """Median wall time of each ``(call, warm-up count)``, timed round-robin (one call of each per round), in a
    new random order every round.

    Interleaving spreads this machine's slow drifts in speed over every path alike, instead of favouring
    whichever path ran in a fast spell; shuffling spreads what a call pays for the one before it (in a fixed
    order the first quantized path, always timed after the bf16 GEMM, came out 1.17x slower than the same
    layer timed later in the round).
    """
    for call, warmup in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    order, shuffle = list(calls), random.Random(0).shuffle
    start, rounds = time.perf_counter(), 0
    while rounds < max_rounds and (rounds < 5 or time.perf_counter() - start < budget_s):
        shuffle(order)
        for name in order:
            call = calls[name][0]
            t0 = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def bandwidths_gbs() -> dict[str, float]:
    """Copy (read + write of a 512 MiB float32 buffer into another, already touched) and read (a sum over it)
    bandwidth in GB/s."""
    src = torch.ones(128 * 2**20)
    dst = torch.zeros_like(src)
    seconds = interleaved_medians({"copy": (lambda: dst.copy_(src), 3), "read": (lambda: src.sum(), 3)},
                                  budget_s=3.0, max_rounds=20)
    return {"copy": 2 * src.numel() * 4 / seconds["copy"] / 1e9, "read": src.numel() * 4 / seconds["read"] / 1e9}


def random_spqr(out_features: int, in_features: int, scheme: QuantScheme) -> SpQRQuantizedTensor:
    """An SpQR layer of random codes, second-level statistics, a permutation and 1% outliers (speed does not
    depend on the values; quantizing a large layer would take minutes)."""
    groups, blocks = -(-in_features // scheme.group_size), -(-out_features // 16)

    def stats() -> StatCodes:
        return StatCodes(torch.randint(0, 8, (groups, out_features), dtype=torch.uint8),
                         (torch.rand(groups, blocks) * 1e-3 + 1e-4).half(), (torch.rand(groups, blocks) * 7).half())

    mask = torch.rand(out_features, in_features) < 0.01
    return SpQRQuantizedTensor(
        codes=torch.randint(0, 2**scheme.bits, (out_features, in_features), dtype=torch.uint8),
        scale_stats=stats(), zero_stats=stats(), outliers=CsrOutliers.from_mask(mask, torch.randn(out_features, in_features)),
        scheme=scheme, stat_bits=3, stat_group_size=16, perm=torch.randperm(in_features))


def quantized_layer(in_features: int, out_features: int, path: Path_) -> QuantLinear:
    """A QuantLinear holding random codes (speed does not depend on their values), its kernel built; FP4
    layers round a random weight, since their scales must be valid encodings."""
    scheme = path.scheme
    if path.spqr:
        qt = random_spqr(out_features, in_features, scheme)
    elif scheme.is_float:
        qt = make_quantizer("rtn").quantize(torch.randn(out_features, in_features) * 0.02, LayerStats(), scheme)
    else:
        size = in_features if scheme.group_size == -1 else scheme.group_size
        groups = scheme.num_groups(in_features)
        g_idx = None
        if path.act_order:
            g_idx = torch.empty(in_features, dtype=torch.int32)
            g_idx[torch.randperm(in_features)] = (torch.arange(in_features) // size).to(torch.int32)
        qt = IntQuantizedTensor(
            codes=torch.randint(0, 2**scheme.bits, (out_features, in_features), dtype=torch.uint8),
            scales=(torch.rand(out_features, groups) * 0.01 + 1e-3).half(),
            zeros=torch.randint(0, 2**scheme.bits, (out_features, groups), dtype=torch.uint8),
            scheme=scheme,
            g_idx=g_idx,
        )
    layer = QuantLinear(in_features, out_features, False, qt.meta(), torch.float32, backend=path.backend)
    for name, tensor in qt.to_tensors().items():
        setattr(layer, name, tensor)
    with isa_override(path.isa):
        layer.prepare(qt, path.dtype)
    return layer


def stored_bytes(layer: QuantLinear) -> int:
    return sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in layer.tensor_names)


class SpQRPart:
    """One part of an SpQR layer's int8 decode (``path.spqr_part``) as a call on decode activations, with the
    bytes it reads: the dense tiles (codes and statistic records) or the outliers' C correction."""

    def __init__(self, in_features: int, out_features: int, path: Path_) -> None:
        kernel = quantized_layer(in_features, out_features, path)._kernel(torch.device("cpu"), torch.float32)[1]
        if kernel.records is None:
            raise RuntimeError(f"no int8 decode from SpQR statistic records in this build ({kernel!r})")
        self.out_features, self.records, self.correction = out_features, kernel.records, kernel.correction
        self.dense = path.spqr_part == "dense"
        tensors = self.records.tensors if self.dense else (self.correction.offsets, self.correction.columns,
                                                           self.correction.deltas)
        self.nbytes = sum(t.nbytes for t in tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense:
            return self.records.product(x)
        return self.correction.add_to(x.new_zeros(x.shape[0], self.out_features), x)


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


def kernel_description(layer: QuantLinear, dtype: torch.dtype) -> str:
    """The kernel that serves ``layer`` for ``dtype`` inputs, as its repr (build, decode and prefill paths)."""
    name, kernel = layer._kernel(torch.device("cpu"), dtype)
    return repr(kernel) if name.startswith("cpu") else name


def measure(rows_per_call: list[int], shapes: dict[str, tuple[int, int]], budget_s: float, max_runs: int,
            bandwidth: dict[str, float], cold: bool, console: Console) -> list[dict]:
    results = []
    for shape_name, (in_features, out_features) in shapes.items():
        paths, kernels = {}, {}
        for path, dtype in (("fp32 dense", torch.float32), ("bf16 dense", torch.bfloat16)):
            size = in_features * out_features * dtype.itemsize
            paths[path] = (rotating(partial(dense_layer, in_features, out_features, dtype), size, cold), size, dtype)
        for path, spec in QUANT_PATHS.items():
            if spec.spqr_part:
                try:
                    size, kernels[path] = SpQRPart(in_features, out_features, spec).nbytes, f"{spec.spqr_part} of the int8 decode"
                except RuntimeError as exc:
                    console.log(f"{path}: skipped, {exc}")
                    continue
                make = partial(SpQRPart, in_features, out_features, spec)
            else:
                probe = quantized_layer(in_features, out_features, spec)
                size, kernels[path] = stored_bytes(probe), kernel_description(probe, spec.dtype)
                make = partial(quantized_layer, in_features, out_features, spec)
            paths[path] = (rotating(make, size, cold), size, spec.dtype)
        for rows in rows_per_call:
            # the reference path, the portable C build, torch's float32 int4 op (seconds a call) and SpQR's parts
            # only for decode
            timed = {path: entry for path, entry in paths.items()
                     if rows == 1 or not path.endswith(("dequant", "@portable", "aten fp32", "part"))}
            inputs = {path: torch.randn(rows, in_features).to(dtype) for path, (_, _, dtype) in timed.items()}
            calls = {path: (partial(call, inputs[path]), copies + 3) for path, ((call, copies), _, _) in timed.items()}
            with torch.inference_mode():
                seconds = interleaved_medians(calls, budget_s, max_runs)
            for path, (_, weight_bytes, _) in timed.items():
                moved = weight_bytes + (in_features + out_features) * rows * inputs[path].element_size()
                rate = moved / seconds[path] / 1e9
                row = {"shape": shape_name, "M": rows, "path": path, "kernel": kernels.get(path, "torch"),
                       "ms": seconds[path] * 1e3, "bytes": moved, "GB/s": rate,
                       "fraction_of_read_bw": rate / bandwidth["read"], "fraction_of_copy_bw": rate / bandwidth["copy"],
                       "speedup_vs_fp32": seconds["fp32 dense"] / seconds[path]}
                results.append(row)
                console.log(f"{shape_name} M={rows} {path}: {row['ms']:.3f} ms, x{row['speedup_vs_fp32']:.2f}")
    return results


def render(results: list[dict], bandwidth: dict[str, float], cold: bool, cpu: dict, console: Console) -> None:
    table = Table(title=f"CPU linear kernels, {'cold' if cold else 'hot'} cache; {cpu['model']}, "
                        f"{torch.get_num_threads()} threads, build {cpu['isa']}; read {bandwidth['read']:.1f} GB/s, "
                        f"copy {bandwidth['copy']:.1f} GB/s")
    for column in ("shape", "M", "path", "ms/call", "MB moved", "GB/s", "% read bw", "vs fp32"):
        table.add_column(column, justify="left" if column in ("shape", "path") else "right")
    for r in results:
        table.add_row(r["shape"], str(r["M"]), r["path"], f"{r['ms']:.3f}", f"{r['bytes'] / 1e6:.1f}",
                      f"{r['GB/s']:.1f}", f"{100 * r['fraction_of_read_bw']:.0f}", f"{r['speedup_vs_fp32']:.2f}x")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one small shape, few repetitions")
    parser.add_argument("--hot", action="store_true", help="reuse one copy of each layer (cache-resident when small)")
    parser.add_argument("--shapes", help="comma list of shape names (or their first word) to run, e.g. llama7b-up")
    parser.add_argument("--paths", help="comma list of quantized paths to run (default: all)")
    parser.add_argument("--rows", help="comma list of batch sizes M to time (default: 1,128,512; --quick 1,128)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_kernels" / "bench_kernels.json")
    args = parser.parse_args()
    console = Console(width=150)
    torch.manual_seed(0)
    cpu = describe()
    console.log(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}; C kernel build "
                f"{cpu['isa']} (of {', '.join(cpu['builds'])}), prefill {cpu['prefill']}")
    if args.quick:
        shapes, rows, budget, max_runs = {k: v for k, v in SHAPES.items() if k.startswith("smollm2-up")}, [1, 128], 1.0, 20
    else:
        shapes, rows, budget, max_runs = SHAPES, [1, 128, 512], 10.0, 200
    if args.rows:
        rows = [int(m) for m in args.rows.split(",")]
    if args.shapes:
        wanted = [w.strip() for w in args.shapes.split(",") if w.strip()]
        shapes = {k: v for k, v in SHAPES.items() if any(k == w or k.split()[0] == w for w in wanted)}
        if not shapes:
            raise SystemExit(f"no shape matches {args.shapes!r}; known: {', '.join(s.split()[0] for s in SHAPES)}")
    if args.paths:
        wanted = [w.strip() for w in args.paths.split(",")]
        unknown = [w for w in wanted if w not in QUANT_PATHS]
        if unknown:
            raise SystemExit(f"unknown paths {unknown}; known: {', '.join(QUANT_PATHS)}")
        for name in set(QUANT_PATHS) - set(wanted):
            del QUANT_PATHS[name]
    bandwidth = bandwidths_gbs()
    console.log(f"read bandwidth {bandwidth['read']:.2f} GB/s, copy bandwidth {bandwidth['copy']:.2f} GB/s")
    results = measure(rows, shapes, budget, max_runs, bandwidth, not args.hot, console)
    render(results, bandwidth, not args.hot, cpu, console)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"cpu": cpu, "bandwidth_gbs": bandwidth, "threads": torch.get_num_threads(), "torch": torch.__version__,
               "cache": "hot" if args.hot else "cold", "results": results}
    args.output.write_text(json.dumps(payload, indent=2) + "\n")
    console.log(f"saved {args.output}")


if __name__ == "__main__":
    main()
