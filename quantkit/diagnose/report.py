"""The diagnosis report: rich tables, ``diagnose.json`` and a heat map (blocks × linears) PNG, written as the
evaluation report is (:func:`quantkit.eval.report.write_report_files`)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from rich.table import Table

from quantkit.diagnose.repair import RepairTarget
from quantkit.eval.report import write_report_files

REPORT_JSON = "diagnose.json"
HEATMAP = "heatmap.png"
_EXPERT = re.compile(r"\.(\d+)\.")  # an expert's index inside a linear's name


def _row(unit: dict) -> list[str]:
    return [f"{unit['weights']:,}", f"{unit['kl_alone']:.4g}", f"{unit['top1_alone']:.3f}", f"{unit['kl_restored']:.4g}",
            f"{unit['top1_restored']:.3f}", f"{unit['gain']:.4g}", f"{unit['output_error']:.3g}"]


def _table(title: str, first: str, units: list[dict]) -> Table:
    table = Table(title=title)
    for column in (first, "weights", "KL alone", "top-1 alone", "KL restored", "top-1 restored", "KL gain",
                   "output error"):
        table.add_column(column, justify="left" if column == first else "right")
    for unit in units:
        table.add_row(unit["name"], *_row(unit))
    return table


def report_tables(report: dict, top: int) -> list[Table]:
    """The blocks, the ``top`` units by KL gain when restored, and the repair if one was asked for."""
    total = report["total"]
    caption = (f"quantized model: KL {total['kl']:.4g}, top-1 {total['top1']:.3f} on {report['settings']['windows']} "
               f"x {report['settings']['seqlen']} tokens of {report['settings']['heldout']}")
    blocks = _table("Blocks: quantized alone (in the float model) and restored alone (in the quantized model)",
                    "block", report["blocks"])
    blocks.caption = caption
    ranked = sorted(report["units"], key=lambda unit: -unit["gain"])[:top]
    tables = [blocks, _table(f"The {len(ranked)} {report['settings']['granularity']} units whose restoring gains "
                             "the most KL", report["settings"]["granularity"], ranked)]
    repair = report["repair"]
    if repair is not None:
        table = Table(title=f"Repair to {RepairTarget(**repair['target'])}: {repair['count']} units at {repair['bits']} bits")
        for column in ("units raised", "KL", "top-1"):
            table.add_column(column, justify="right")
        for tried in repair["tried"]:
            table.add_row(str(tried["count"]), f"{tried['kl']:.4g}", f"{tried['top1']:.3f}")
        table.caption = (f"{repair['bits_per_weight']:.4f} bits per weight, {repair['added_bytes']:,} bytes added; "
                         f"plan: {repair['plan']}")
        tables.append(table)
    return tables


def heat_grid(report: dict, key: str) -> tuple[list[str], list[list[float]]]:
    """``(columns, rows)``: per block (rows) and per linear of the architecture (columns, an expert's linears
    summed over its experts), the sum of ``key`` over the units of that linear; NaN where a block has none."""
    prefixes = [f"{block['name']}." for block in report["blocks"]]
    columns = list(report["linear_names"])
    grid = [[math.nan] * len(columns) for _ in prefixes]
    for unit in report["units"]:
        for layer in unit["layers"]:
            row = next(i for i, prefix in enumerate(prefixes) if layer.startswith(prefix))
            name = _EXPERT.sub(".*.", layer[len(prefixes[row]):])
            if name not in columns:
                columns.append(name)
                for cells in grid:
                    cells.append(math.nan)
            col = columns.index(name)
            share = unit[key] / len(unit["layers"])  # a group's value spread over its linears
            grid[row][col] = share if math.isnan(grid[row][col]) else grid[row][col] + share
    return columns, grid


def plot_heatmap(report: dict, path: Path) -> bool:
    """Two heat maps, blocks × linears: the KL restoring each gains, and its relative output error (grey: none,
    or not above 0: a gain within the noise of the held-out windows can come out negative)."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    from quantkit.eval.plots import new_figure, save_png

    figure, first = new_figure(12, max(3.0, 0.25 * len(report["blocks"]) + 2))
    figure.delaxes(first)
    left, right = figure.subplots(1, 2)
    for axes, key, title in ((left, "gain", "KL gain when restored to float"),
                             (right, "output_error", "relative output error (calibration)")):
        columns, grid = heat_grid(report, key)
        values = [v for row in grid for v in row if not math.isnan(v) and v > 0]
        low, high = (min(values), max(values)) if values else (1e-9, 1.0)
        positive = [[v if v > 0 else math.nan for v in row] for row in grid]  # no gain (or noise below 0): grey
        cmap = colormaps["magma"].with_extremes(bad="lightgrey")
        image = axes.imshow(positive, aspect="auto", cmap=cmap, norm=LogNorm(vmin=low, vmax=max(high, low * 1.01)))
        axes.set_xticks(range(len(columns)), columns, rotation=60, ha="right", fontsize=7)
        axes.set_yticks(range(len(grid)), [str(i) for i in range(len(grid))], fontsize=6)
        axes.set_ylabel("block")
        axes.set_title(title, fontsize=9)
        figure.colorbar(image, ax=axes, shrink=0.8)
    save_png(figure, path)
    return True


def write_diagnosis(report: dict, directory: Path) -> list[Path]:
    """``diagnose.json`` and the heat map into ``directory``; the paths written."""
    texts = {REPORT_JSON: json.dumps(report, indent=2) + "\n"}
    return write_report_files(directory, texts, {HEATMAP: lambda path: plot_heatmap(report, path)})
