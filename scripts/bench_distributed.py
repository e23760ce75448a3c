#!/usr/bin/env python
"""Quantization speed and scale (issue 25): SmolLM2-135M, GPTQ W4 g64 act-order, C4 calibration windows, in one run.

Rows (each quantize run a fresh process; ``--rows`` picks some):

- ``quantkit fp32``: one process, float32 forward passes (the default);
- ``quantkit bf16``: one process, ``--forward-dtype bfloat16`` (autocast forwards; Hessians and solves float32/64);
- ``torchrun bf16``: ``torchrun --nproc-per-node N`` (gloo on the CPU), the same flags as ``quantkit bf16``;
- ``GPTQModel 7.7``: GPTQModel's GPTQ (``desc_act``, its CPU defaults: bfloat16 forwards) of the same float
  weights on the same token windows, in its own venv (scripts/gptqmodel_reference.py).

Per row: wall seconds of the whole process, seconds of quantizing alone (quantkit's ``quantizing`` phase,
GPTQModel's ``model.quantize``), the ratio of each to GPTQModel's, WikiText-2 perplexity (``--windows`` x 2048
tokens; GPTQModel's checkpoint is read by quantkit), and for the torchrun row whether its checkpoint's tensors
are byte-identical to the one-process run's with the same flags (they are when the ranks' shares of windows fall
on the one process's batch boundaries, as 128 windows of 512 tokens over 2 ranks do). Prints the CPU model and
flags and a rich table; saves JSON.

    python scripts/bench_distributed.py                          # the issue protocol (about 20 minutes on 2 cores)
    python scripts/bench_distributed.py --quick                  # 8 x 128 windows, 2 eval windows
    python scripts/bench_distributed.py --rows "quantkit bf16,torchrun bf16" --ranks 2
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trunk import measure_perplexity  # noqa: E402
from check_devices import stored_tensors  # noqa: E402
from gptqmodel_reference import c4_windows, gptqmodel_quantize, hf_folder_of_builtin_model, machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SCHEME = ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--act-order"]
ROWS = ("quantkit fp32", "quantkit bf16", "torchrun bf16", "GPTQModel 7.7")
FORWARD = {"quantkit fp32": "float32", "quantkit bf16": "bfloat16", "torchrun bf16": "bfloat16"}


def quantkit_run(row: str, output: Path, nsamples: int, seqlen: int, ranks: int) -> dict:
    """One `quantkit quantize` process (under torchrun for the torchrun row): wall and quantizing seconds."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks)]
                if row.startswith("torchrun") else [sys.executable])
    command = [*launcher, "-m", "quantkit", "quantize", "smollm2-135m", *SCHEME, "--forward-dtype", FORWARD[row],
               "--calib", "c4", "--data-dir", str(DATA), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
               "--seed", "0", "-o", str(output), "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{row} failed:\n{proc.stderr[-3000:]}")
    phase = re.search(r"^quantizing: done in ([\d.]+) s$", proc.stderr, re.MULTILINE)
    return {"command": " ".join(["python", *command[1:]]), "wall_s": wall,
            "quantize_s": float(phase.group(1)) if phase else None}


def gptqmodel_run(output: Path, nsamples: int, seqlen: int) -> dict:
    """GPTQModel 7.7 on the windows quantkit draws (seed 0), timed inside its runner."""
    windows = c4_windows(nsamples, seqlen, 0, DATA)
    start = time.perf_counter()
    result = gptqmodel_quantize(hf_folder_of_builtin_model(), windows, 4, 64, True, True, output)
    return {"wall_s": time.perf_counter() - start, "quantize_s": result["quantize_s"], "dtype": result.get("dtype"),
            "versions": result.get("versions"), "threads": result.get("threads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 calibration windows x 128 tokens, 2 eval windows")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of: {', '.join(ROWS)}")
    parser.add_argument("--ranks", type=int, default=2, help="torchrun's --nproc-per-node")
    parser.add_argument("--windows", type=int, default=None, help="WikiText-2 evaluation windows (default 16)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_distributed")
    args = parser.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row(s): {', '.join(unknown)}; known: {', '.join(ROWS)}")
    nsamples, seqlen, windows = (8, 128, 2) if args.quick else (128, 512, 16)
    windows = args.windows or windows
    args.out.mkdir(parents=True, exist_ok=True)
    console = Console(width=160)
    facts = machine()
    console.print(f"CPU: {facts['model']}, {facts['cores']} cores | flags: {' '.join(facts['flags'])} | torch "
                  f"threads {facts['torch_threads']}")
    results: dict[str, dict] = {}
    report = args.out / "bench_distributed.json"
    protocol = {"nsamples": nsamples, "seqlen": seqlen, "eval_windows": windows, "ranks": args.ranks}

    def save() -> None:
        report.write_text(json.dumps({"machine": facts, "protocol": protocol, "results": results}, indent=2) + "\n")

    for row in rows:
        output = args.out / row.replace(" ", "-").replace(".", "")
        results[row] = (gptqmodel_run(output, nsamples, seqlen) if row.startswith("GPTQModel")
                        else quantkit_run(row, output, nsamples, seqlen, args.ranks))
        results[row]["perplexity"] = measure_perplexity(str(output), windows)
        console.print(f"{row}: {results[row]}")
        save()
    if "torchrun bf16" in results and "quantkit bf16" in results:
        ranked = stored_tensors(args.out / "torchrun-bf16")
        single = stored_tensors(args.out / "quantkit-bf16")
        results["torchrun bf16"]["tensors_equal_to_one_process"] = f"{sum(ranked.get(k) == v for k, v in single.items())}/{len(single)}"
    reference = results.get("GPTQModel 7.7")
    table = Table(title=f"SmolLM2-135M GPTQ W4 g64 act-order, C4 {nsamples} x {seqlen}, WikiText-2 {windows} x 2048")
    for column in ("row", "wall s", "quantizing s", "wall vs GPTQModel", "quantizing vs GPTQModel", "perplexity",
                   "= one process"):
        table.add_column(column, justify="left" if column == "row" else "right")
    for row, result in results.items():
        def ratio(key: str, result: dict = result) -> str:
            if reference is None or result.get(key) is None or reference.get(key) is None:
                return "—"
            return f"{result[key] / reference[key]:.2f}×"

        quantizing = "—" if result.get("quantize_s") is None else f"{result['quantize_s']:.1f}"
        table.add_row(row, f"{result['wall_s']:.1f}", quantizing, ratio("wall_s"), ratio("quantize_s"),
                      f"{result['perplexity']:.3f}", result.get("tensors_equal_to_one_process", "—"))
    console.print(table)
    save()
    console.print(f"saved {report}")


if __name__ == "__main__":
    main()
