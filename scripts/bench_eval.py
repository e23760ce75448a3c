#!/usr/bin/env python
"""Evaluation benchmark: SmolLM2-135M in float32 and two quantized checkpoints (made from shipped recipes) on
WikiText-2 perplexity and six zero-shot tasks from local files, then the float32 model again through the
plain `lm_eval` command on the same task configs and data, to show that quantkit's numbers are the harness's.

Protocol: checkpoints from `--recipe gptq-w4g64` (GPTQ W4 g64, act-order, 128 x 512 C4 tokens) and
`--recipe rtn-w4g64 --bits 3` (RTN W3 g64); zero-shot PIQA, HellaSwag, ARC-Easy, ARC-Challenge, WinoGrande and
LAMBADA (OpenAI) on the first `--limit` examples of each (quantkit's local task configs reading
../shared/data); perplexity on the first `--max-windows` windows of 2048 tokens of WikiText-2 test. Every step
is a fresh `quantkit` / `lm_eval` process, timed.

    python scripts/bench_eval.py              # limit 200 (about 40 minutes on 2 cores)
    python scripts/bench_eval.py --quick      # limit 10, one window, RTN checkpoints: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantkit.eval.tasks.loaders import LOCAL_TASKS, TASKS_DIR
from quantkit.eval.zeroshot import KEPT_METRICS, STANDARD_TASKS
from quantkit.export.atomic import write_json
from quantkit.models.builtin import resolve_builtin
from quantkit.models.gguf_cache import converted_gguf_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MODEL = "smollm2-135m"
console = Console()


def run(command: list[str], log: Path) -> float:
    """Run ``command`` (its output into ``log``); wall seconds. Fails loudly with the log's tail."""
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                                                "HF_DATASETS_OFFLINE": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    console.print(f"{seconds:7.1f} s  {' '.join(command)}")
    return seconds


def checkpoints(quick: bool) -> dict[str, list[str]]:
    """Checkpoint name -> `quantkit quantize` flags after the model."""
    small = ["--nsamples", "8", "--seqlen", "128"] if quick else []
    first = ["--recipe", "rtn-w4g64"] if quick else ["--recipe", "gptq-w4g64"]
    return {"gptq-w4g64" if not quick else "rtn-w4g64": first + small,
            "rtn-w3g64": ["--recipe", "rtn-w4g64", "--bits", "3", *small]}


def harness_results(folder: Path) -> dict[str, dict]:
    """The task results of the one `results_*.json` that `lm_eval --output_path` wrote under ``folder``."""
    (path,) = folder.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


def agreement(report: dict, direct: dict[str, dict]) -> dict[str, dict]:
    """Per task and metric: quantkit's float32 value, lm_eval's, and their absolute difference."""
    fp32 = next(m for m in report["models"] if not m["quantized"])
    rows: dict[str, dict] = {}
    for task, result in fp32["tasks"].items():
        harness = direct[LOCAL_TASKS[task].task_name]
        for metric in KEPT_METRICS:
            for key in (metric, f"{metric}_stderr"):
                if key in result and result[key] is not None:
                    theirs = float(harness[f"{key},none"])
                    rows[f"{task} {key}"] = {"quantkit": result[key], "lm_eval": theirs,
                                             "abs_diff": abs(result[key] - theirs)}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--max-windows", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_eval")
    args = parser.parse_args()
    limit, windows = (10, 1) if args.quick else (args.limit, args.max_windows)
    args.out.mkdir(parents=True, exist_ok=True)
    quantkit = [sys.executable, "-m", "quantkit"]
    seconds: dict[str, float] = {}
    for name, flags in checkpoints(args.quick).items():
        seconds[f"quantize {name}"] = run([*quantkit, "quantize", MODEL, *flags, "--data-dir", str(DATA),
                                           "-o", str(args.out / name), "--overwrite"], args.out / f"{name}.log")
    tasks = ",".join(STANDARD_TASKS)
    report_dir = args.out / "report"
    seconds["quantkit eval"] = run(
        [*quantkit, "eval", MODEL, *(str(args.out / n) for n in checkpoints(args.quick)), "--ppl", "wikitext2",
         "--max-windows", str(windows), "--tasks", tasks, "--limit", str(limit), "--batch-size", str(args.batch_size),
         "--data-dir", str(DATA), "--report", str(report_dir)], args.out / "eval.log")
    direct_dir = args.out / "lm_eval_direct"
    seconds["lm_eval direct (fp32)"] = run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={converted_gguf_dir(resolve_builtin(MODEL))},dtype=float32", "--device", "cpu",
         "--batch_size", str(args.batch_size), "--include_path", str(TASKS_DIR),
         "--tasks", ",".join(LOCAL_TASKS[t].task_name for t in STANDARD_TASKS), "--limit", str(limit),
         "--metadata", json.dumps({"data_dir": str(DATA)}), "--output_path", str(direct_dir)],
        args.out / "lm_eval_direct.log")
    report = json.loads((report_dir / "report.json").read_text())
    rows = agreement(report, harness_results(direct_dir))
    table = Table(title=f"float32 SmolLM2-135M: quantkit eval vs lm_eval run directly (limit {limit})")
    for column in ("task metric", "quantkit", "lm_eval", "|difference|"):
        table.add_column(column, justify="left" if column == "task metric" else "right")
    for key, row in rows.items():
        table.add_row(key, f"{row['quantkit']:.6f}", f"{row['lm_eval']:.6f}", f"{row['abs_diff']:.2e}")
    console.print(table)
    worst = max(row["abs_diff"] for row in rows.values())
    console.print(f"largest difference: {worst:.3g}" + (" (identical)" if worst == 0 else ""))
    write_json(args.out / "bench_eval.json", {"limit": limit, "max_windows": windows, "batch_size": args.batch_size,
                                              "seconds": seconds, "agreement": rows, "max_abs_diff": worst,
                                              "finite": all(math.isfinite(r["abs_diff"]) for r in rows.values())})
    console.print(f"report: {report_dir}, {args.out / 'bench_eval.json'}")


if __name__ == "__main__":
    main()
