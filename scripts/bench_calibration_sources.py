#!/usr/bin/env python
"""Calibration sources for an instruction-tuned model (issue 26): GPTQ W4 g64 (default settings) of
SmolLM2-135M-Instruct calibrated on
- c4: 128 x 512 windows of the local C4 validation parquet;
- self: its own answers to a mix of prompts through its chat template (`--calib self`, 128 x 256);
- chat: C4 documents made conversations (`--calib chat:FILE`, 128 x 512 windows, each opening a conversation):
  the user asks to continue a document's first sentences, the assistant answers with the rest. No chat data set
  is on disk, so this measures the chat template's framing of real text, not a chat corpus;
- synthetic: text sampled from a uniform first token (`--calib synthetic`, 128 x 64).
Each checkpoint and the float model: WikiText-2 perplexity (16 x 2048), and zero-shot accuracy on six tasks
(first `--limit` examples each) through one `quantkit eval`.

Each quantize run is a fresh process (scripts/bench_trunk.py's protocol). Prints the CPU model and flags and a
rich table; saves JSON.

    python scripts/bench_calibration_sources.py --sources c4,self,chat   # about 45 minutes on 2 cores
    python scripts/bench_calibration_sources.py --sources chat --windows 4 --limit 20
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_trunk import C4, DATA, ROOT, measure_perplexity, timed_quantize  # noqa: E402

from quantkit.eval.report import headline, model_average  # noqa: E402
from quantkit.eval.zeroshot import STANDARD_TASKS  # noqa: E402
from quantkit.export.atomic import write_json  # noqa: E402
from quantkit.runtime.kernels import describe_machine  # noqa: E402
from quantkit.textsources import read_documents  # noqa: E402

CHAT_FILE = "c4-conversations.jsonl"
SOURCES = {"c4": (str(C4), 128, 512), "self": ("self", 128, 256), "chat": (f"chat:{CHAT_FILE}", 128, 512),
           "synthetic": ("synthetic", 128, 64)}
OPENING_SENTENCES = 2


def write_conversations(path: Path) -> Path:
    """Every C4 validation document of more than two sentences as one conversation: the user asks to continue its
    first two sentences, the assistant answers with the rest."""
    lines = []
    for document in read_documents(C4):
        sentences = re.split(r"(?<=[.!?])\s+", document.strip())
        if len(sentences) <= OPENING_SENTENCES:
            continue
        opening, rest = " ".join(sentences[:OPENING_SENTENCES]), " ".join(sentences[OPENING_SENTENCES:])
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"Continue this text: {opening}"},
                                              {"role": "assistant", "content": rest}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def zero_shot(targets: dict[str, str], limit: int, report_dir: Path) -> dict[str, dict]:
    """Name -> {task: headline accuracy, "average": ...} of one `quantkit eval` over every target."""
    command = [sys.executable, "-m", "quantkit", "eval", *targets.values(), "--tasks", ",".join(STANDARD_TASKS),
               "--limit", str(limit), "--data-dir", str(DATA), "--report", str(report_dir)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"quantkit eval failed:\n{proc.stderr[-3000:]}")
    models = json.loads((report_dir / "report.json").read_text())["models"]
    scores = {}
    for name, model in zip(targets, models, strict=True):
        scores[name] = {task: headline(metrics)[1] for task, metrics in model["tasks"].items()}
        scores[name]["average"] = model_average(model["tasks"])
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma list of: " + ", ".join(SOURCES))
    parser.add_argument("--windows", type=int, default=16, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--limit", type=int, default=200, help="zero-shot examples per task (0: no zero-shot)")
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
    targets = {"float": "smollm2-135m"}
    for name in names:
        calib, nsamples, seqlen = SOURCES[name]
        if name == "chat":
            calib = f"chat:{write_conversations(args.out / CHAT_FILE)}"
        output = args.out / f"gptq-w4g64-{name}"
        row = timed_quantize(["--method", "gptq", "--bits", "4", "--group-size", "64"], output, nsamples, seqlen,
                             calib=calib)
        rows[name] = {**row, "calibration": f"{nsamples} x {seqlen}", "perplexity": measure_perplexity(str(output), args.windows)}
        targets[name] = str(output)
        console.print(f"{name}: {rows[name]}")
    if args.limit:
        for name, scores in zero_shot(targets, args.limit, args.out / "report").items():
            rows[name]["zero_shot"] = scores
    table = Table(title=f"SmolLM2-135M-Instruct GPTQ W4 g64 by calibration source (WikiText-2, {args.windows} x 2048;"
                        f" zero-shot accuracy, first {args.limit} of each task)")
    tasks = [*STANDARD_TASKS, "average"] if args.limit else []
    for column in ("calibration", "windows", "quantize wall s", "perplexity", *tasks):
        table.add_column(column, justify="right")
    for name, row in rows.items():
        accuracy = [f"{100 * row['zero_shot'][task]:.1f}" for task in tasks]
        table.add_row(name, row.get("calibration", "—"), f"{row['wall_s']:.1f}" if "wall_s" in row else "—",
                      f"{row['perplexity']:.3f}", *accuracy)
    console.print(table)
    report = args.out / "bench_calibration_sources.json"
    write_json(report, {"machine": machine, "windows": args.windows, "limit": args.limit, "rows": rows})
    console.print(f"saved {report}")


if __name__ == "__main__":
    main()
