#!/usr/bin/env python
"""First use: the README's main job timed as a new user runs it, and what the synthetic calibration shape costs.

1. The main job: the `quantkit ...` steps of the README's set-up command (everything after the installs), run
   as they are, once with an empty cache (the GGUF file is converted first) and once warm. Each phase's time
   comes from the lines quantkit prints when stderr is not a terminal.
2. Synthetic calibration shapes (`--shapes`): GPTQ W4 g64 on SmolLM2-135M calibrated on N x L tokens sampled
   from the model, for a few shapes of the same token count: calibration time, quantize time and perplexity
   on the first 16 windows x 2048 tokens of WikiText-2 test (the trunk benchmark's protocol).

    python scripts/bench_first_use.py                      # both parts (about 10 minutes on 2 cores)
    python scripts/bench_first_use.py --skip-shapes        # the main job only
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantkit.export.atomic import write_json
from quantkit_kernels.cpu_isa import describe

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
PHASE = re.compile(r"^(?P<name>.+?): (?:done|[\d./]+) in (?P<seconds>[\d.]+) s$")


def main_job_steps() -> list[list[str]]:
    """The `quantkit ...` commands of the README's set-up line, in order."""
    text = (ROOT / "README.md").read_text()
    line = next(line for line in text.splitlines() if line.startswith("python3 -m venv") and "quantkit quantize" in line)
    return [shlex.split(step) for step in line.split(" && ") if step.startswith("quantkit ")]


def run_timed(command: list[str], cwd: Path, env: dict) -> dict:
    """Run ``command`` (quantkit through this interpreter); wall seconds and the phase lines it printed."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *command], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{proc.stderr[-3000:]}")
    phases = {m["name"]: float(m["seconds"]) for m in map(PHASE.match, proc.stderr.splitlines()) if m}
    return {"command": shlex.join(command), "wall_s": round(seconds, 1), "phases": phases}


def main_job(work: Path) -> dict:
    """The README's main job with an empty quantkit cache, then again with the cache it left."""
    env = {**os.environ, "QUANTKIT_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1"}
    runs = {}
    for state in ("fresh cache", "warm cache"):
        steps = [run_timed(step, work, env) for step in main_job_steps()]
        runs[state] = {"wall_s": round(sum(s["wall_s"] for s in steps), 1), "steps": steps}
    return runs


def shape_run(work: Path, nsamples: int, seqlen: int) -> dict:
    """GPTQ W4 g64 with N x L synthetic windows: phase times and WikiText-2 perplexity."""
    out, report = work / f"w4g64-{nsamples}x{seqlen}", work / f"report-{nsamples}x{seqlen}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    quantized = run_timed(["quantkit", "quantize", "smollm2-135m", "--method", "gptq", "--bits", "4", "--group-size",
                           "64", "--calib", "synthetic", "--nsamples", str(nsamples), "--seqlen", str(seqlen), "-o",
                           str(out)], work, env)
    run_timed(["quantkit", "eval", str(out), "--ppl", str(WIKITEXT), "--seqlen", "2048", "--max-windows", "16",
               "--report", str(report)], work, env)
    model = json.loads((report / "report.json").read_text())["models"][0]
    phases = quantized["phases"]
    return {"nsamples": nsamples, "seqlen": seqlen,
            "calibration_s": phases.get("synthetic calibration"), "quantize_s": phases.get("quantizing"),
            "quantize_wall_s": quantized["wall_s"],
            "wikitext2_ppl": model["perplexity"][str(WIKITEXT)]["perplexity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="32x256,64x128,128x64", help="synthetic N x L shapes to compare")
    parser.add_argument("--skip-shapes", action="store_true")
    parser.add_argument("--skip-main-job", action="store_true")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "bench_first_use.json")
    args = parser.parse_args()
    console = Console()
    cpu = describe()
    console.print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}")
    results: dict = {"cpu": cpu}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.skip_main_job:
            results["main_job"] = main_job(work)
            table = Table(title="README main job")
            for column in ("cache", "step", "wall s", "phases (s)"):
                table.add_column(column)
            for state, run in results["main_job"].items():
                for step in run["steps"]:
                    phases = ", ".join(f"{name} {seconds:g}" for name, seconds in step["phases"].items())
                    table.add_row(state, step["command"], f"{step['wall_s']:.1f}", phases)
                table.add_row(state, "total", f"{run['wall_s']:.1f}", "")
            console.print(table)
        if not args.skip_shapes:
            shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
            results["shapes"] = [shape_run(work, n, length) for n, length in shapes]
            table = Table(title="GPTQ W4 g64, synthetic calibration shapes (WikiText-2, 16 x 2048)")
            for column in ("N x L", "calibration s", "quantize s", "quantize wall s", "perplexity"):
                table.add_column(column, justify="right")
            for row in results["shapes"]:
                table.add_row(f"{row['nsamples']} x {row['seqlen']}", f"{row['calibration_s']:.1f}",
                              f"{row['quantize_s']:.1f}", f"{row['quantize_wall_s']:.1f}", f"{row['wikitext2_ppl']:.3f}")
            console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.json, results)
    console.print(f"saved {args.json}")


if __name__ == "__main__":
    main()
