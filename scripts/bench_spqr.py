#!/usr/bin/env python
"""SpQR benchmark: SmolLM2-135M perplexity against measured bits per weight, next to GPTQ.

Same protocol as the Trunk benchmark (scripts/bench_trunk.py): calibration 128 x 512 tokens of the C4
validation parquet (seed 0), perplexity on the first 16 x 2048 tokens of WikiText-2 test; every quantize run
is its own process under `/usr/bin/time -v`. Bits per weight and the outlier fraction are read from the
checkpoint written (`quantkit inspect`), i.e. counted from the tensors actually stored.

    python scripts/bench_spqr.py                 # the full table (about an hour on 2 cores)
    python scripts/bench_spqr.py --quick         # a small smoke run of the same code path
    python scripts/bench_spqr.py --resume        # keep the configs already in the JSON report, run the rest
"""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trunk import parse_bench_args, run_configs  # noqa: E402

SPQR = ["--method", "spqr", "--group-size", "16", "--asym", "--act-order"]
# name -> quantize flags (None: the float model itself)
CONFIGS: dict[str, list[str] | None] = {
    "fp32": None,
    "gptq-w3g64-sym": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--act-order"],
    "gptq-w3g32-sym": ["--method", "gptq", "--bits", "3", "--group-size", "32", "--sym", "--act-order"],
    "gptq-w4g64-sym": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order"],
    "spqr-w3g16-no-outliers": [*SPQR, "--bits", "3", "--outlier-threshold", "inf"],
    "spqr-w3g16-t1": [*SPQR, "--bits", "3", "--outlier-threshold", "1"],
    "spqr-w3g16-t0.45": [*SPQR, "--bits", "3", "--outlier-threshold", "0.45"],
    "spqr-w3g16-t0.2": [*SPQR, "--bits", "3", "--outlier-threshold", "0.2"],
    "spqr-w4g16-t0.2": [*SPQR, "--bits", "4", "--outlier-threshold", "0.2"],
    "spqr-w3g16-t0.2-simplified": [*SPQR, "--bits", "3", "--outlier-threshold", "0.2", "--simplified-outliers"],
}


def main() -> None:
    args, names, settings = parse_bench_args(__doc__, CONFIGS, "bench_spqr", resume=True)
    nsamples, seqlen, windows = settings
    console = Console(width=160)
    rows = run_configs(CONFIGS, names, args.out / "bench_spqr.json", settings, resume=args.resume)

    table = Table(title=f"SmolLM2-135M, WikiText-2 perplexity ({windows} x 2048), calib {nsamples} x {seqlen} C4")
    columns = ("config", "perplexity", "bits/weight", "codes", "stats", "outliers", "perm", "outlier %",
               "quantize wall s", "peak RSS MiB")
    for column in columns:
        table.add_column(column, justify="left" if column == "config" else "right")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for name, row in rows.items():
        roles = row["role_bits"]
        table.add_row(name, fmt(row["perplexity"], ".2f"), fmt(row["bits_per_weight"], ".3f"),
                      *(fmt(roles.get(r), ".3f") for r in ("codes", "statistics", "outliers", "permutation")),
                      fmt(100 * row["outlier_fraction"], ".2f"), fmt(row["wall_s"], ".1f"),
                      fmt(row["peak_rss_mib"], ".0f"))
    console.print(table)
    console.print(f"saved {args.out / 'bench_spqr.json'}")


if __name__ == "__main__":
    main()
