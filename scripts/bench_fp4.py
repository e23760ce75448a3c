#!/usr/bin/env python
"""FP4 benchmark: SmolLM2-135M perplexity and bits per weight for INT4, MXFP4 and NVFP4, RTN against GPTQ,
weight-only (W4A16) and with NVFP4 activations (W4A4).

Same protocol as the Trunk benchmark (scripts/bench_trunk.py): calibration 128 x 512 tokens of the C4
validation parquet (seed 0), perplexity on the first 16 x 2048 tokens of WikiText-2 test; every quantize run
is its own process under `/usr/bin/time -v`; bits per weight are counted from the checkpoint written.

    python scripts/bench_fp4.py                  # the full table (about 1.5 hours on 2 cores)
    python scripts/bench_fp4.py --quick          # a small smoke run of the same code path
    python scripts/bench_fp4.py --resume         # keep the configs already in the JSON report, run the rest
    python scripts/bench_fp4.py --scale-rules    # MXFP4 E8M0 scale rounding rules: RTN weight error only
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trunk import ROOT, parse_bench_args, run_configs  # noqa: E402

NV, MX = ["--format", "nvfp4"], ["--format", "mxfp4"]
GPTQ, RTN = ["--method", "gptq", "--act-order"], ["--method", "rtn"]
# name -> quantize flags (None: the float model itself)
CONFIGS: dict[str, list[str] | None] = {
    "fp32": None,
    "nvfp4-rtn": [*RTN, *NV],
    "nvfp4-gptq": [*GPTQ, *NV],
    "mxfp4-rtn": [*RTN, *MX],
    "mxfp4-gptq": [*GPTQ, *MX],
    "nvfp4-w4a4-rtn": [*RTN, *NV, "--act-bits", "4"],
    "nvfp4-w4a4-gptq": [*GPTQ, *NV, "--act-bits", "4"],
    "int4-g32-rtn": [*RTN, "--bits", "4", "--group-size", "32", "--sym"],
    "int4-g32-gptq": [*GPTQ, "--bits", "4", "--group-size", "32", "--sym"],
    "int4-g16-rtn": [*RTN, "--bits", "4", "--group-size", "16", "--sym"],
    "int4-g16-gptq": [*GPTQ, "--bits", "4", "--group-size", "16", "--sym"],
    "nvfp4-rtn-search": [*RTN, *NV, "--mse"],
    "nvfp4-gptq-search": [*GPTQ, *NV, "--mse"],
    "nvfp4-w4a8-gptq": [*GPTQ, *NV, "--act-bits", "8"],
    "nvfp4-gptq-no-act-order": ["--method", "gptq", "--no-act-order", *NV],
    "fp4-g32-rtn": [*RTN, "--format", "fp4", "--group-size", "32"],
    "fp4-g32-gptq": [*GPTQ, "--format", "fp4", "--group-size", "32"],
}


def main() -> None:
    if "--scale-rules" in sys.argv:
        scale_rules()
        return
    args, names, settings = parse_bench_args(__doc__, CONFIGS, "bench_fp4", resume=True)
    nsamples, seqlen, windows = settings
    rows = run_configs(CONFIGS, names, args.out / "bench_fp4.json", settings, resume=args.resume)
    table = Table(title=f"SmolLM2-135M, WikiText-2 perplexity ({windows} x 2048), calib {nsamples} x {seqlen} C4")
    for column in ("config", "perplexity", "bits/weight", "codes", "scales", "quantize wall s", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "config" else "right")
    fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
    for name, row in rows.items():
        roles = row["role_bits"]
        table.add_row(name, fmt(row["perplexity"], ".2f"), fmt(row["bits_per_weight"], ".3f"),
                      fmt(roles.get("codes"), ".3f"), fmt(roles.get("statistics"), ".3f"),
                      fmt(row["wall_s"], ".1f"), fmt(row["peak_rss_mib"], ".0f"))
    Console(width=150).print(table)


def scale_rules() -> None:
    """Relative squared error of MXFP4 round-to-nearest over every linear of SmolLM2, per E8M0 rounding rule."""
    from quantkit.formats.e2m1 import SCALE_CODECS, e2m1_decode, e2m1_encode
    from quantkit.models.loading import load_model

    loaded = load_model("smollm2-135m")
    rules = {
        "ocp-floor (amax/scale in [4, 8))": lambda a: torch.floor(torch.log2(a)) - 2,
        "ceil (amax/scale in (3, 6])": lambda a: torch.ceil(torch.log2(a / 6)),
        "quantkit (amax/scale in [3.5, 7))": lambda a: SCALE_CODECS["mxfp4"].encode(a.float()).double() - 127,
    }
    error = dict.fromkeys(rules, 0.0)
    energy = 0.0
    for block in loaded.adapter.get_blocks(loaded.model):
        for name in loaded.adapter.linear_names():
            w = block.get_submodule(name).weight.detach().double().reshape(-1, 32)
            amax = w.abs().amax(dim=1, keepdim=True).clamp_min(2.0**-126)
            energy += float((w**2).sum())
            for rule, exponent in rules.items():
                scale = torch.exp2(exponent(amax))
                q = e2m1_decode(e2m1_encode((w / scale).float())).double() * scale
                error[rule] += float(((q - w) ** 2).sum())
    results = {rule: err / energy for rule, err in error.items()}
    table = Table(title="MXFP4 RTN on SmolLM2-135M's linears: relative squared weight error by E8M0 rule")
    table.add_column("rule")
    table.add_column("sum (q - w)^2 / sum w^2", justify="right")
    for rule, value in results.items():
        table.add_row(rule, f"{value:.5f}")
    Console(width=150).print(table)
    out = ROOT / "results" / "bench_fp4"
    out.mkdir(parents=True, exist_ok=True)
    (out / "scale_rules.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
