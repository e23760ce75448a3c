#!/usr/bin/env python
"""Where a quantize run's time goes: a GPTQ run of SmolLM2-135M under cProfile, split into phases.

The run is `quantkit quantize smollm2-135m --method gptq --bits 4 --group-size 64` with C4 calibration (the
issue protocol: 128 windows x 512 tokens, act-order on by default), in its own process under
`python -m cProfile`. The phases are the cumulative times of the calls that make them up:

- block linears: torch's `linear` (the calibration forward passes through every block),
- attention: torch's `scaled_dot_product_attention`,
- Hessians: `HessianAccumulator.add` (the Gram products of every group's inputs),
- solves: the quantizer's `quantize_together` (inverse Hessian factor, column sweep, grids),
- other: the rest of the run (loading, calibration text, the model's other modules, writing).

cProfile costs a few percent, alike across phases. Prints the CPU model and flags, a rich table (seconds and
seconds per block), and saves JSON.

    python scripts/bench_quantize_split.py                    # the issue protocol (about 3.5 minutes)
    python scripts/bench_quantize_split.py --nsamples 8 --seqlen 128   # a quick look
    python scripts/bench_quantize_split.py --forward-dtype bfloat16    # bfloat16 forward passes and Gram products
"""

from __future__ import annotations

import argparse
import json
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantkit_kernels.cpu_isa import describe

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = 30  # SmolLM2-135M's decoder blocks
# phase -> (file suffix, function name) of the profiled calls whose cumulative time makes it up
PHASES = {
    "block linears": ("~", "<built-in method torch._C._nn.linear>"),
    "attention": ("~", "<built-in method torch._C._nn.scaled_dot_product_attention>"),
    "Hessians": ("quantkit/hessian.py", "add"),
    "solves": ("quantkit/quantizers/gptq.py", "quantize_together"),
}


def phase_seconds(profile: Path) -> dict[str, float]:
    """Cumulative seconds of each phase and of the whole run (``total``) in a cProfile dump."""
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    seconds = {name: sum(entry[3] for (file, _line, func), entry in stats.items() if file.endswith(suffix) and func == fn)
               for name, (suffix, fn) in PHASES.items()}
    seconds["total"] = max(entry[3] for entry in stats.values())
    seconds["other"] = seconds["total"] - sum(seconds[name] for name in PHASES)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--forward-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=None, help="default: results/bench_quantize_split[-bfloat16].json")
    args = parser.parse_args()
    suffix = "" if args.forward_dtype == "float32" else f"-{args.forward_dtype}"
    args.output = args.output or ROOT / "results" / f"bench_quantize_split{suffix}.json"
    console = Console(width=140)
    cpu = describe()
    console.log(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}")
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "run.prof"
        command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "quantkit", "quantize", "smollm2-135m",
                   "--method", "gptq", "--bits", "4", "--group-size", "64", "--calib", "c4", "--nsamples",
                   str(args.nsamples), "--seqlen", str(args.seqlen), "--data-dir", str(args.data_dir),
                   "--forward-dtype", args.forward_dtype, "-o", str(Path(tmp) / "out"), "--overwrite"]
        console.log(" ".join(command[3:]))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = phase_seconds(profile)
    table = Table(title=f"GPTQ W4 g64 of SmolLM2-135M, C4 {args.nsamples} x {args.seqlen}, {args.forward_dtype} "
                        f"forwards; {cpu['model']}")
    for column in ("phase", "s", "s per block", "share"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for name in (*PHASES, "other", "total"):
        table.add_row(name, f"{seconds[name]:.1f}", f"{seconds[name] / BLOCKS:.2f}", f"{seconds[name] / seconds['total']:.0%}")
    console.print(table)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"cpu": cpu, "nsamples": args.nsamples, "seqlen": args.seqlen,
                                       "forward_dtype": args.forward_dtype, "seconds": seconds}, indent=2) + "\n")
    console.log(f"saved {args.output}")


if __name__ == "__main__":
    main()
