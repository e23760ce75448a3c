#!/usr/bin/env python
"""Trunk benchmark: SmolLM2-135M, fp32 vs RTN vs GPTQ, perplexity, quantize wall time and peak RSS.

Protocol (issue #2): calibration 128 windows x 512 tokens from the C4 validation parquet, GPTQ-style
sampling with seed 0; perplexity on the first 16 windows x 2048 tokens of WikiText-2 test (CRLF -> LF).
Every quantize run is its own process under `/usr/bin/time -v`, so wall time and peak RSS include model
loading, calibration, quantization and export, as a user would see them.

    python scripts/bench_trunk.py                 # the full table (about 25 minutes on 2 cores)
    python scripts/bench_trunk.py --quick         # a small smoke run of the same code path
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"

# name -> quantize flags (None: the float model itself)
CONFIGS: dict[str, list[str] | None] = {
    "fp32": None,
    "rtn-w4g64-sym": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--sym"],
    "rtn-w4g64-asym": ["--method", "rtn", "--bits", "4", "--group-size", "64", "--asym"],
    "rtn-w3g64-sym": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--sym"],
    "rtn-w3g64-asym": ["--method", "rtn", "--bits", "3", "--group-size", "64", "--asym"],
    "gptq-w4g64-sym-actorder": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order"],
    "gptq-w4g64-sym-actorder-gidx": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order", "--g-idx"],
    "gptq-w4g64-sym-actorder-groupaware": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order", "--no-static-groups"],
    "gptq-w4g64-sym": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--no-act-order"],
    "gptq-w3g64-sym-actorder": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--act-order"],
    "gptq-w3g64-sym-actorder-gidx": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--act-order", "--g-idx"],
    "gptq-w3g64-sym-actorder-groupaware": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--act-order", "--no-static-groups"],
    "gptq-w3g64-sym": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--no-act-order"],
    "gptq-w4g64-sym-actorder-mse": ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order", "--mse"],
    "gptq-w3g64-sym-actorder-mse": ["--method", "gptq", "--bits", "3", "--group-size", "64", "--sym", "--act-order", "--mse"],
}

# GPTQModel 7.7 on this machine under the same protocol (issue #2): perplexity, quantize wall seconds.
REFERENCE = {
    "fp32": (20.82, None),
    "rtn-w4g64-sym": (28.84, None),
    "rtn-w4g64-asym": (27.19, None),
    "rtn-w3g64-sym": (166.9, None),
    "rtn-w3g64-asym": (70.68, None),
    "gptq-w4g64-sym-actorder": (26.96, 248.0),
    "gptq-w3g64-sym-actorder": (57.18, 254.0),
}


def timed_quantize(flags: list[str], output: Path, nsamples: int, seqlen: int, seed: int = 0,
                   calib: str = str(C4)) -> dict:
    """Run `quantkit quantize` in a fresh process under /usr/bin/time -v; wall seconds and peak RSS."""
    command = [
        "/usr/bin/time", "-v", sys.executable, "-m", "quantkit", "quantize", "smollm2-135m", *flags,
        "--calib", calib, "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--seed", str(seed),
        "-o", str(output), "--overwrite",
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed ({' '.join(flags)}):\n{proc.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", proc.stderr).group(1)
    parts = [float(p) for p in wall.split(":")]
    seconds = sum(p * 60**i for i, p in enumerate(reversed(parts)))
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return {"wall_s": seconds, "peak_rss_mib": rss_kb / 1024}


def measure_perplexity(target: str, windows: int) -> float:
    from quantkit.eval.models import load_target
    from quantkit.eval.perplexity import perplexity, tokenize_stream
    from quantkit.textsources import load_eval_text

    text, _ = load_eval_text(str(WIKITEXT))
    loaded = load_target(target)
    return perplexity(loaded.model, tokenize_stream(text, loaded.tokenizer), 2048, windows, "wikitext2").perplexity


def parse_bench_args(
    description: str, configs: dict, out: str, resume: bool = False
) -> tuple[argparse.Namespace, list[str], tuple[int, int, int]]:
    """Command line of a perplexity benchmark: the namespace, the configs to run, (nsamples, seqlen, windows)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if resume:
        parser.add_argument("--resume", action="store_true", help="keep the results already saved, run the rest")
    parser.add_argument("--quick", action="store_true", help="8 calibration windows x 128 tokens, 2 eval windows")
    parser.add_argument("--configs", default=",".join(configs), help="comma list of configs to run")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / out)
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise SystemExit(f"unknown config(s): {', '.join(unknown)}; known: {', '.join(configs)}")
    args.out.mkdir(parents=True, exist_ok=True)
    return args, names, (8, 128, 2) if args.quick else (128, 512, 16)


def run_configs(configs: dict, names: list[str], report: Path, settings: tuple[int, int, int], resume: bool = False,
                extra: dict | None = None) -> dict[str, dict]:
    """Quantize (timed) and evaluate each named config, saving the JSON ``report`` after every one.

    A row holds wall seconds, peak RSS, perplexity and, from the checkpoint written, bits per weight, the
    per-role bits and the outlier fraction. With ``resume`` the rows already in ``report`` are kept.
    """
    nsamples, seqlen, windows = settings
    console = Console(width=150)
    rows = json.loads(report.read_text())["results"] if resume and report.is_file() else {}
    for name in [n for n in names if n not in rows]:
        flags = configs[name]
        start = time.perf_counter()
        if flags is None:
            row: dict = {"wall_s": None, "peak_rss_mib": None, "bits_per_weight": 32.0, "outlier_fraction": 0.0,
                         "role_bits": {}}
            target = "smollm2-135m"
        else:
            from quantkit.checkpoint_info import inspect_checkpoint

            target = str(report.parent / name)
            row = timed_quantize(flags, Path(target), nsamples, seqlen)
            total = inspect_checkpoint(target).to_dict()["total"]
            row.update(bits_per_weight=total["bits_per_weight"], outlier_fraction=total["outlier_fraction"],
                       role_bits=total["role_bits"])
        row["perplexity"] = measure_perplexity(target, windows)
        rows[name] = row
        console.print(f"{name}: {row} ({time.perf_counter() - start:.0f} s)")
        payload = {"protocol": {"nsamples": nsamples, "seqlen": seqlen, "eval_windows": windows, "eval_seqlen": 2048},
                   "configs": {n: configs[n] for n in rows}, "results": rows, **(extra or {})}
        report.write_text(json.dumps(payload, indent=2) + "\n")
    return rows


def main() -> None:
    args, names, settings = parse_bench_args(__doc__, CONFIGS, "bench_trunk")
    nsamples, seqlen, windows = settings
    console = Console(width=150)
    path = args.out / "bench_trunk.json"
    rows = run_configs(CONFIGS, names, path, settings, extra={"reference_gptqmodel_7_7": REFERENCE})
    table = Table(title=f"SmolLM2-135M, WikiText-2 perplexity ({windows} x 2048), calib {nsamples} x {seqlen} C4")
    for column in ("config", "perplexity", "GPTQModel 7.7 ppl", "quantize wall s", "GPTQModel wall s", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "config" else "right")
    for name, row in rows.items():
        ref_ppl, ref_wall = REFERENCE.get(name, (None, None))
        fmt = lambda v, spec: "—" if v is None else format(v, spec)  # noqa: E731
        table.add_row(name, fmt(row["perplexity"], ".2f"), fmt(ref_ppl, ".2f"), fmt(row["wall_s"], ".1f"),
                      fmt(ref_wall, ".0f"), fmt(row["peak_rss_mib"], ".0f"))
    console.print(table)
    console.print(f"saved {path}")


if __name__ == "__main__":
    main()
