#!/usr/bin/env python
"""Routed experts solved as one batched GPTQ sweep against one expert at a time (issue 25).

Per shape: ``--experts`` experts of a random MoE layer, each a gate/up pair sharing one Hessian (stacked rows,
``[2 x inner, hidden]``) and a down projection (``[hidden, inner]``) with a Hessian of its own, every Hessian from
its own correlated random inputs. GPTQ W4 g64 with the default settings (act-order) solves them as the engine
does: one call per group of linears holding every expert (one batched sweep), against one call per expert.
Reports the seconds of each, their ratio, and whether the tensors are byte-identical (they must be). Prints the
CPU model and flags and a rich table; saves JSON.

    python scripts/bench_expert_batch.py                 # 64 experts 512 x 128 and 16 experts 1024 x 512
    python scripts/bench_expert_batch.py --quick         # 8 experts 256 x 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from quantkit.hessian import HessianAccumulator
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import LayerStats
from quantkit.runtime.kernels import describe_machine

ROOT = Path(__file__).resolve().parent.parent


def hessian_stats(features: int, tokens: int, gen: torch.Generator) -> LayerStats:
    """Statistics of correlated random inputs with a spread of channel scales (as activations have)."""
    mix = torch.randn(features, features, generator=gen) / features**0.5
    scales = torch.logspace(-1, 1, features)[torch.randperm(features, generator=gen)]
    x = (torch.randn(tokens, features, generator=gen) @ mix) * scales
    acc = HessianAccumulator(features)
    acc.add(x)
    return LayerStats(acc.hessian(), acc.tokens)


def expert_layer(experts: int, hidden: int, inner: int, tokens: int, seed: int = 0) -> list[dict]:
    """Each expert's weights and statistics: gate, up (one Hessian) and down (another)."""
    gen = torch.Generator().manual_seed(seed)
    layer = []
    for _ in range(experts):
        entry, down = hessian_stats(hidden, tokens, gen), hessian_stats(inner, tokens, gen)
        layer.append({"gate_up": ([torch.randn(inner, hidden, generator=gen) * 0.02 for _ in range(2)], [entry, entry]),
                      "down": ([torch.randn(hidden, inner, generator=gen) * 0.02], [down])})
    return layer


def solve(quantizer, scheme, layer: list[dict], batched: bool) -> tuple[float, list[dict]]:
    """Seconds to solve every expert's linears, one call per group (``batched``) or per expert and group."""
    start = time.perf_counter()
    results = []
    for group in ("gate_up", "down"):
        calls = [layer] if batched else [[expert] for expert in layer]
        for experts in calls:
            weights = [w for expert in experts for w in expert[group][0]]
            stats = [s for expert in experts for s in expert[group][1]]
            results += [qt.to_tensors() for qt in quantizer.quantize_together(weights, stats, scheme)]
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 experts of 256 x 64")
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens per Hessian")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_expert_batch.json")
    args = parser.parse_args()
    shapes = [(8, 256, 64)] if args.quick else [(64, 512, 128), (16, 1024, 512)]
    console = Console(width=150)
    machine = describe_machine()
    console.print(f"CPU: {machine['model']}, {machine['cores']} cores | flags: {' '.join(machine['flags'])} | "
                  f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    quantizer = make_quantizer("gptq")
    scheme = quantizer.default_scheme(4, 64, True)
    rows = []
    for experts, hidden, inner in shapes:
        layer = expert_layer(experts, hidden, inner, args.tokens)
        solve(quantizer, scheme, layer[:1], False)  # warm-up
        alone_s, alone = solve(quantizer, scheme, layer, False)
        batched_s, together = solve(quantizer, scheme, layer, True)
        identical = all(a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(alone, together))
        rows.append({"experts": experts, "hidden": hidden, "inner": inner, "one_at_a_time_s": round(alone_s, 3),
                     "batched_s": round(batched_s, 3), "ratio": round(batched_s / alone_s, 3), "identical": identical})
    table = Table(title="GPTQ W4 g64 of routed experts: one batched sweep per group vs one expert at a time")
    for column in ("experts", "hidden x inner", "one at a time s", "batched s", "batched / alone", "byte-identical"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row["experts"]), f"{row['hidden']} x {row['inner']}", f"{row['one_at_a_time_s']:.2f}",
                      f"{row['batched_s']:.2f}", f"{row['ratio']:.2f}x", str(row["identical"]))
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "tokens": args.tokens, "rows": rows}, indent=1))
    console.print(f"saved {args.out}")
    if not all(row["identical"] for row in rows):
        sys.exit("batched and one-at-a-time solves differ")


if __name__ == "__main__":
    main()
