"""Rendering evaluation results: a rich table on screen and a JSON file."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from quantkit.eval.run import EvalReport
from quantkit.export.atomic import write_json


def relative_increase(value: float, baseline: float) -> float:
    return (value - baseline) / baseline


def perplexity_table(report: EvalReport) -> Table:
    """Rows: datasets; columns: baseline, each model, and each model's increase over the baseline."""
    request = report.request
    table = Table(title=f"Perplexity (seqlen {request.seqlen}, " + (
        f"first {request.max_windows} windows)" if request.max_windows else "all windows)"))
    table.add_column("dataset")
    base = request.baseline
    if base:
        table.add_column(f"{base} (baseline)", justify="right")
    for target in request.targets:
        table.add_column(target, justify="right")
        if base:
            table.add_column("Δ vs baseline", justify="right")
    for dataset in request.datasets:
        row = [dataset]
        if base:
            row.append(f"{report.results[base][dataset]['perplexity']:.3f}")
        for target in request.targets:
            ppl = report.results[target][dataset]["perplexity"]
            row.append(f"{ppl:.3f}")
            if base:
                row.append(f"{relative_increase(ppl, report.results[base][dataset]['perplexity']):+.2%}")
        table.add_row(*row)
    return table


def save_json(report: EvalReport, path: Path) -> None:
    payload = {"request": asdict(report.request), "sources": report.sources, "results": report.results}
    if report.request.baseline:
        base = report.results[report.request.baseline]
        payload["relative_increase"] = {
            t: {d: relative_increase(r["perplexity"], base[d]["perplexity"]) for d, r in report.results[t].items()}
            for t in report.request.targets
        }
    write_json(path, payload)
