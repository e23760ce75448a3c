#!/usr/bin/env python
"""GPTQ quality over calibration seeds (issue 25): SmolLM2-135M with the default GPTQ settings at W4 g64 and W3 g64,
calibrated on C4 128 x 512 windows drawn with seeds 0, 1 and 2; WikiText-2 perplexity (16 x 2048) of each, their
mean and spread (max - min).

Each run is a fresh `quantkit quantize` process (scripts/bench_trunk.py's protocol). ``--forward-dtype bfloat16``
measures the bfloat16 forward passes instead of float32. Prints the CPU model and flags and a rich table; saves JSON.

    python scripts/bench_seeds.py                                  # W4 and W3, seeds 0-2 (about 25 minutes)
    python scripts/bench_seeds.py --bits 4 --forward-dtype bfloat16
    python scripts/bench_seeds.py --quick                          # 8 x 128 windows, 2 eval windows, seed 0
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trunk import ROOT, measure_perplexity, timed_quantize  # noqa: E402

from quantkit.runtime.kernels import describe_machine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="4,3", help="comma list of widths (group size 64, symmetric)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--forward-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--quick", action="store_true", help="8 calibration windows x 128 tokens, 2 eval windows")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_seeds")
    args = parser.parse_args()
    widths = [int(b) for b in args.bits.split(",")]
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]
    nsamples, seqlen, windows = (8, 128, 2) if args.quick else (128, 512, 16)
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    machine = describe_machine()
    console.print(f"CPU: {machine['model']}, {machine['cores']} cores | flags: {' '.join(machine['flags'])}")
    report = args.out / f"bench_seeds-{args.forward_dtype}.json"
    results: dict[str, dict] = {}
    for bits in widths:
        name = f"gptq-w{bits}g64-{args.forward_dtype}"
        runs = {}
        for seed in seeds:
            flags = ["--method", "gptq", "--bits", str(bits), "--group-size", "64", "--forward-dtype", args.forward_dtype]
            output = args.out / f"{name}-seed{seed}"
            row = timed_quantize(flags, output, nsamples, seqlen, seed)
            row["perplexity"] = measure_perplexity(str(output), windows)
            runs[seed] = row
            console.print(f"{name} seed {seed}: {row}")
        values = [run["perplexity"] for run in runs.values()]
        results[name] = {"runs": runs, "mean": statistics.fmean(values), "spread": max(values) - min(values)}
        report.write_text(json.dumps({"machine": machine, "protocol": {"nsamples": nsamples, "seqlen": seqlen,
                                      "eval_windows": windows, "seeds": seeds}, "results": results}, indent=2) + "\n")
    table = Table(title=f"SmolLM2-135M default GPTQ, C4 {nsamples} x {seqlen} per seed, WikiText-2 {windows} x 2048")
    for column in ("config", *(f"seed {s}" for s in seeds), "mean", "spread", "wall s (mean)"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for name, result in results.items():
        runs = result["runs"]
        table.add_row(name, *(f"{runs[s]['perplexity']:.3f}" for s in seeds), f"{result['mean']:.3f}",
                      f"{result['spread']:.3f}", f"{statistics.fmean(r['wall_s'] for r in runs.values()):.1f}")
    console.print(table)
    console.print(f"saved {report}")


if __name__ == "__main__":
    main()
