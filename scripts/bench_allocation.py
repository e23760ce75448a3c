#!/usr/bin/env python
"""Mixed-bits benchmark: SmolLM2-135M perplexity against average bits per weight (as written) for uniform
GPTQ, the score-ranked allocations (LIM, ZD), the knapsack solver (NMSE and KL errors), random allocations
and the evolutionary search; writes a JSON report and a PNG plot of perplexity vs bits.

Protocol: GPTQ (act-order, static groups, so no g_idx) on a symmetric integer grid with groups of 64 columns;
choices 2, 3, 4 and 8 bits per linear; calibration 64 windows x 512 tokens of the C4 validation parquet
(seed 0). One layer database serves every row (each linear quantized at every width, Hessians propagated
through the 3-bit model, EvoPress's setting); each allocation is evaluated by installing the database's
weights. KL measurements use 8 pieces of 256 calibration tokens. Perplexity: the first 3 windows x 2048
tokens of WikiText-2 test. Targets: 2.5, 3, 3.5 and 4 bits, and the bits uniform 3- and 4-bit GPTQ write,
so that every strategy meets uniform at exactly its size. Last, the real pipeline (`quantize` with the
search's plan, then `quantkit.load` of the checkpoint) runs at one target next to a uniform GPTQ checkpoint.

    python scripts/bench_allocation.py            # the full table (about an hour on 2 cores)
    python scripts/bench_allocation.py --quick    # small budgets, one window: a smoke run of the same code
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import quantkit
from quantkit.allocation.allocate import choose
from quantkit.allocation.costs import bits_per_weight
from quantkit.allocation.measure import measure
from quantkit.allocation.options import CPU_SEARCH, AllocationOptions
from quantkit.allocation.search import SearchBudget
from quantkit.api import CalibrationSpec, quantize
from quantkit.calib import load_calibration
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.engine.passes import swapped_weights
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.export.atomic import write_json
from quantkit.models.loading import load_model
from quantkit.quantizers import make_quantizer
from quantkit.schemes import QuantScheme
from quantkit.textsources import load_eval_text

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CHOICES = (2, 3, 4, 8)
GPTQ_OPTIONS = {"act_order": True, "static_groups": True}
TARGETS, QUICK_TARGETS = (2.5, 3.0, 3.5, 4.0), (2.5, 3.5)
# (label, strategy, score, seed)
STRATEGIES = [
    ("ranked LIM", "ranked", "lim", 0),
    ("ranked ZD", "ranked", "zd", 0),
    ("solver NMSE", "solver", "error", 0),
    ("solver KL", "solver", "kl", 0),
    ("random #1", "random", None, 1),
    ("random #2", "random", None, 2),
    ("search", "auto", "kl", 0),
]


def _ceil4(value: float) -> float:
    """``value`` rounded up at the 4th decimal (a target that admits exactly ``value`` bits)."""
    return math.ceil(value * 10**4) / 10**4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small calibration, search and eval: a smoke run")
    parser.add_argument("--pipeline-target", type=float, default=3.5, help="target of the real quantize run")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_allocation")
    args = parser.parse_args()
    if args.pipeline_target not in (QUICK_TARGETS if args.quick else TARGETS):
        parser.error(f"--pipeline-target must be one of the targets searched: {QUICK_TARGETS if args.quick else TARGETS}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "bench_allocation"
    nsamples, seqlen, windows = (8, 256, 1) if args.quick else (64, 512, 3)
    search = SearchBudget(2, 4, (2, 1), (1, 2)) if args.quick else CPU_SEARCH
    console = Console(width=160)
    base = QuantScheme(3, 64, True)
    quantizer = make_quantizer("gptq", **GPTQ_OPTIONS)

    text, _ = load_eval_text(str(WIKITEXT))
    loaded = load_model("smollm2-135m")
    model = loaded.model
    tokens = tokenize_stream(text, loaded.tokenizer)
    calib = load_calibration(str(C4), loaded.tokenizer, nsamples, seqlen, 0, model=model)

    def ppl(target: torch.nn.Module = model) -> float:
        return perplexity(target, tokens, 2048, windows, "wikitext2").perplexity

    report: dict = {"protocol": {"calibration": [nsamples, seqlen], "eval_windows": windows, "eval_seqlen": 2048,
                                 "group_size": base.group_size, "choices": CHOICES, "gptq": GPTQ_OPTIONS,
                                 "search": search.__dict__, "propagate_bits": 3},
                    "fp32": ppl(), "seconds": {}, "rows": []}

    def save() -> None:
        write_json(args.out / f"{name}.json", report)

    start = time.perf_counter()
    options = AllocationOptions(3.0, CHOICES, propagate_bits=3, search=search,
                                kl_windows=4 if args.quick else 8, kl_seqlen=128 if args.quick else 256)
    sens = measure(model, loaded.adapter, quantizer, base, options, calib, ("error", "kl", "lim", "zd"))
    report["seconds"]["measure"] = time.perf_counter() - start
    report["scores"] = {"units": [u.name for u in sens.units], **sens.scores}
    save()

    def evaluate(label: str, strategy: str, target: float | None, allocation: list[int], seconds: float,
                 history: list[float] | None = None) -> None:
        assignment = {layer: c for unit, c in zip(sens.units, allocation) for layer in unit.layers}
        nbytes = sum(sens.costs[u][c] for u, c in enumerate(allocation))
        with swapped_weights(model, sens.database.weights(assignment)):
            row = {"label": label, "strategy": strategy, "target": target,
                   "bits_per_weight": bits_per_weight(nbytes, sum(sens.weights)), "perplexity": ppl(),
                   "seconds": seconds, "bits": [CHOICES[c] for c in allocation], "search_history": history or []}
        report["rows"].append(row)
        console.print(f"{label:>12} target {target}: {row['bits_per_weight']:.4f} bits, ppl {row['perplexity']:.2f}")
        save()

    for level, bits in enumerate(CHOICES):
        evaluate(f"uniform {bits}", "uniform", None, [level] * len(sens.units), 0.0)
    uniform_bits = {r["label"]: r["bits_per_weight"] for r in report["rows"]}
    # and the bits uniform 3- and 4-bit write, so that every strategy meets uniform at exactly its size
    targets = [*TARGETS, _ceil4(uniform_bits["uniform 3"]), _ceil4(uniform_bits["uniform 4"])]
    for target in QUICK_TARGETS if args.quick else targets:
        for label, strategy, score, seed in STRATEGIES:
            start = time.perf_counter()
            plan = choose(sens, model, replace(options, target_bits=target, strategy=strategy, score=score, seed=seed))
            allocation = [CHOICES.index(unit.bits) for unit in plan.units]
            evaluate(label, strategy, target, allocation, time.perf_counter() - start, plan.search_history)
            if strategy == "auto" and target == args.pipeline_target:
                report["pipeline_plan"] = plan.to_dict()
    _pipeline(args, report, loaded.source, base, calib.shape, ppl, save)
    _print(console, report)
    _plot(report, args.out / f"{name}.png")
    save()


def _pipeline(args: argparse.Namespace, report: dict, source: str, base: QuantScheme, calib_shape: torch.Size,
              ppl, save) -> None:
    """The real `quantize` with the search's plan, and uniform GPTQ, each written, loaded and evaluated."""
    from quantkit.allocation.plan import AllocationPlan

    plan = AllocationPlan.from_dict(report.get("pipeline_plan"), "pipeline plan")
    calibration = CalibrationSpec(str(C4), calib_shape[0], calib_shape[1])
    runs = [("pipeline search", plan, base), ("pipeline uniform 3", None, replace(base, bits=3)),
            ("pipeline uniform 4", None, replace(base, bits=4))]
    for label, allocation, scheme in runs:
        folder = args.out / label.replace(" ", "-")
        start = time.perf_counter()
        quantize(source, "gptq", scheme, calibration, folder, overwrite=True, allocation=allocation, **GPTQ_OPTIONS)
        seconds = time.perf_counter() - start
        info = inspect_checkpoint(folder)
        report["rows"].append({"label": label, "strategy": "pipeline", "target": plan.target_bits if allocation else None,
                               "bits_per_weight": info.bits_per_weight, "perplexity": ppl(quantkit.load(folder)),
                               "seconds": seconds, "bits": [], "search_history": []})
        save()


def _print(console: Console, report: dict) -> None:
    table = Table(title=f"SmolLM2-135M WikiText-2 perplexity (fp32 {report['fp32']:.2f}) vs bits per weight written")
    for column in ("allocation", "target", "bits/weight", "perplexity", "seconds"):
        table.add_column(column, justify="left" if column == "allocation" else "right")
    for row in report["rows"]:
        table.add_row(row["label"], "" if row["target"] is None else f"{row['target']}",
                      f"{row['bits_per_weight']:.4f}", f"{row['perplexity']:.2f}", f"{row['seconds']:.0f}")
    console.print(table)


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    labels = list(dict.fromkeys(row["label"] for row in report["rows"]))
    for label in labels:
        rows = sorted((r for r in report["rows"] if r["label"] == label), key=lambda r: r["bits_per_weight"])
        if label.startswith("uniform"):
            continue
        style = "*" if label.startswith("pipeline") else "o-"
        axes.plot([r["bits_per_weight"] for r in rows], [r["perplexity"] for r in rows], style, label=label)
    uniform = sorted((r for r in report["rows"] if r["strategy"] == "uniform"), key=lambda r: r["bits_per_weight"])
    axes.plot([r["bits_per_weight"] for r in uniform], [r["perplexity"] for r in uniform], "ks--", label="uniform GPTQ")
    axes.axhline(report["fp32"], color="grey", linestyle=":", label="fp32")
    axes.set_xlabel("bits per quantized weight (codes, scales, zeros as written)")
    axes.set_ylabel("WikiText-2 perplexity (log)")
    axes.set_yscale("log")
    axes.set_xlim(2.2, 4.6)
    axes.set_ylim(report["fp32"] * 0.9, 1000)  # 2-bit models of this size are off the chart (see the JSON)
    axes.set_title("SmolLM2-135M, GPTQ g64: mixed-bit allocations")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
