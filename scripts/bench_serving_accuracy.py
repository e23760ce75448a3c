#!/usr/bin/env python
"""What the fast CPU serving paths cost in accuracy: WikiText-2 perplexity of one loaded SmolLM2-135M checkpoint
served by each path, against the exact one.

Paths (each on the same loaded weights, the C kernels of the best build this CPU has):
- ``exact``: float32 activations everywhere (``cpu`` backend, ``$QUANTKIT_CPU_PREFILL=fp32``);
- ``bf16 prefill``: long inputs multiply bfloat16 slabs (the default where the CPU has native bf16);
- ``int8 decode``: the ``cpu-int8`` backend's GEMV, activations rounded to int8 per block of 32, forced on
  every row (perplexity windows are prefill-sized; decode runs this path one token at a time);
- ``float decode``: the exact float GEMV forced on every row (a check: it must equal ``exact``).
Checkpoints are bench_generate.py's (RTN W4 g64 symmetric, W8 per-channel symmetric, RTN NVFP4, SpQR W3 g16;
made once under results/bench_generate). Windows: the first --windows of --seqlen tokens of WikiText-2 test.

    python scripts/bench_serving_accuracy.py            # 8 windows x 1024 tokens, W4, W8, NVFP4 and SpQR
    python scripts/bench_serving_accuracy.py --quick    # 2 windows x 256 tokens, W4
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import quantkit
import quantkit_kernels.cpu_int as cpu_int
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.export.atomic import write_json
from quantkit.runtime.quant_linear import set_backend
from quantkit.textsources import load_eval_text
from quantkit_kernels.cpu_isa import PREFILL_ENV, describe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import WIKITEXT, ensure_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# path -> (backend, prefill dtype, every row through the decode GEMV)
PATHS = {"exact": ("cpu", "fp32", False), "bf16 prefill": ("cpu", "bf16", False),
         "int8 decode": ("cpu-int8", "fp32", True), "float decode": ("cpu", "fp32", True)}


def path_perplexity(model, tokens: torch.Tensor, path: str, seqlen: int, windows: int) -> float:
    backend, prefill, all_rows_gemv = PATHS[path]
    os.environ[PREFILL_ENV] = prefill
    set_backend(model, backend)  # kernels are rebuilt on the next call, with this prefill dtype
    gemv_rows = cpu_int.GEMV_MAX_ROWS
    cpu_int.GEMV_MAX_ROWS = seqlen if all_rows_gemv else gemv_rows
    try:
        with torch.inference_mode():
            return perplexity(model, tokens, seqlen=seqlen, max_windows=windows).perplexity
    finally:
        cpu_int.GEMV_MAX_ROWS = gemv_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "bench_serving_accuracy.json")
    args = parser.parse_args()
    console = Console(width=150)
    cpu = describe()
    console.log(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}; build {cpu['isa']}")
    seqlen, windows, names = (256, 2, ["w4"]) if args.quick else (1024, 8, ["w4", "w8", "nvfp4", "spqr-w3"])
    results = {}
    for name in names:
        checkpoint = ensure_checkpoint(name, ROOT / "results" / "bench_generate")
        model = quantkit.load(checkpoint)
        tokens = tokenize_stream(load_eval_text(str(WIKITEXT))[0], quantkit.load_tokenizer(checkpoint))
        for path in PATHS:
            results[f"{name} {path}"] = path_perplexity(model, tokens, path, seqlen, windows)
            console.log(f"{name} {path}: {results[f'{name} {path}']:.4f}")
    table = Table(title=f"SmolLM2-135M WikiText-2 perplexity by serving path ({windows} x {seqlen} tokens, build {cpu['isa']})")
    for column in ("checkpoint", "path", "perplexity", "vs exact"):
        table.add_column(column, justify="left" if column in ("checkpoint", "path") else "right")
    for name in names:
        exact = results[f"{name} exact"]
        for path in PATHS:
            value = results[f"{name} {path}"]
            table.add_row(name, path, f"{value:.4f}", f"{100 * (value / exact - 1):+.3f}%")
    console.print(table)
    write_json(args.output, {"cpu": cpu, "seqlen": seqlen, "windows": windows, "perplexity": results})
    console.log(f"saved {args.output}")


if __name__ == "__main__":
    main()
