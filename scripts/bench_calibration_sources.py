#!/usr/bin/env python
"""Calibration sources for an instruction-tuned model (issue 26): GPTQ W4 g64 (default settings) of
SmolLM2-135M-Instruct calibrated on C4 (128 x 512 windows of the local validation parquet), on its own answers
to a mix of prompts through its chat template (`--calib self`, 128 x 256), and on text sampled from a uniform first
token (`--calib synthetic`, 128 x 64); WikiText-2 perplexity (16 x 2048) of each, and of the float model.

Each quantize run is a fresh process (scripts/bench_trunk.py's protocol). Prints the CPU model and flags and a
rich table; saves JSON.

    python scripts/bench_calibration_sources.py                       # about 20 minutes on 2 cores
    python scripts/bench_calibration_sources.py --sources c4,self --windows 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trunk import C4, ROOT, measure_perplexity, timed_quantize  # noqa: E402

from quantkit.runtime.kernels import describe_machine  # noqa: E402

SOURCES = {"c4": (str(C4), 128, 512), "self": ("self", 128, 256), "synthetic": ("synthetic", 128, 64)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma list of: " + ", ".join(SOURCES))
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_calibration_sources")
    args = parser.parse_args()
    names = [name.strip() for name in args.sources.split(",") if name.strip()]
    unknown = [name for name in names if name not in SOURCES]
    if unknown:
        parser.error(f"unknown source {unknown[0]!r}; choose from {', '.join(SOURCES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=150)
    machine = describe_machine()
    console.print(f"CPU: {machine['model']}, {machine['cores']} cores | flags: {' '.join(machine['flags'])}")
    rows = {"float": {"perplexity": measure_perplexity("smollm2-135m", args.windows)}}
    for name in names:
        calib, nsamples, seqlen = SOURCES[name]
        output = args.out / f"gptq-w4g64-{name}"
        row = timed_quantize(["--method", "gptq", "--bits", "4", "--group-size", "64"], output, nsamples, seqlen,
                             calib=calib)
        rows[name] = {**row, "calibration": f"{nsamples} x {seqlen}", "perplexity": measure_perplexity(str(output), args.windows)}
        console.print(f"{name}: {rows[name]}")
    table = Table(title=f"SmolLM2-135M-Instruct GPTQ W4 g64 by calibration source (WikiText-2, {args.windows} x 2048)")
    for column in ("calibration", "windows", "quantize wall s", "perplexity"):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        table.add_row(name, row.get("calibration", "—"), f"{row['wall_s']:.1f}" if "wall_s" in row else "—",
                      f"{row['perplexity']:.3f}")
    console.print(table)
    report = args.out / "bench_calibration_sources.json"
    report.write_text(json.dumps({"machine": machine, "windows": args.windows, "rows": rows}, indent=1))
    console.print(f"saved {report}")


if __name__ == "__main__":
    main()
