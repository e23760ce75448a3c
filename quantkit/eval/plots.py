"""PNG plots of an evaluation report: perplexity against bits per weight, and task accuracy per model.

matplotlib is imported inside the functions (an Agg canvas, no pyplot state), so importing the report stays
light.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from quantkit.eval.report import headline, task_metric

UNQUANTIZED_BITS = 16.0  # at or above: a reference line rather than a point far to the right


def new_figure(width: float, height: float):
    """A figure on an Agg canvas and its one axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def save_png(figure, path: Path) -> None:
    """Write ``figure`` as a PNG at ``path`` through a temporary sibling, so no half-written file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        figure.savefig(tmp, format="png", dpi=150)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def plot_perplexity_vs_bits(report: dict, path: Path) -> bool:
    """Perplexity (log scale) against bits per weight, one marker series per dataset, each point named after
    its model; unquantized models are dashed lines. False, and no file, when the report has no perplexity."""
    models = report["models"]
    if not any(model["perplexity"] for model in models):
        return False
    from matplotlib.ticker import LogFormatter

    figure, axes = new_figure(8, 5)
    for i, dataset in enumerate(report["settings"]["ppl"]):
        colour = f"C{i}"
        measured = [
            (m["name"], m["bits_per_weight"], m["perplexity"][dataset]["perplexity"])
            for m in models
            if dataset in m["perplexity"] and m["perplexity"][dataset]["perplexity"] is not None
        ]
        points = [(bits, ppl, name) for name, bits, ppl in measured if bits < UNQUANTIZED_BITS]
        axes.plot([x for x, _, _ in points], [y for _, y, _ in points], "o", color=colour, label=dataset)
        for x, y, name in points:
            axes.annotate(name, (x, y), xytext=(4, 4), textcoords="offset points", fontsize=8, color=colour)
        for name, bits, ppl in measured:
            if bits >= UNQUANTIZED_BITS:
                axes.axhline(ppl, color=colour, linestyle="--", linewidth=1)
                side = i % 2  # alternate ends, so that the labels of close lines do not overlap
                axes.annotate(
                    f"{name} ({bits:g} bits)",
                    (1 - side, ppl),
                    xycoords=("axes fraction", "data"),
                    xytext=(8 * side - 4, 3),
                    textcoords="offset points",
                    ha=("right", "left")[side],
                    fontsize=8,
                    color=colour,
                )
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))  # 30, not 3 x 10^1
    axes.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
    axes.set_xlabel("bits per weight")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(f"Perplexity against bits per weight (seqlen {report['settings']['seqlen']})")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(title="dataset")
    save_png(figure, path)
    return True


def plot_task_accuracy(report: dict, path: Path) -> bool:
    """Grouped bars, one group per task and one for the average, one bar per model: the headline metric in
    percent with its stderr as error bar. An average over fewer tasks than the others is hatched and labelled.
    False, and no file, when the report has no tasks."""
    models = report["models"]
    if not any(model["tasks"] for model in models):
        return False
    tasks = report["settings"]["tasks"]
    labels = [f"{task}\n({task_metric(models, task)})" for task in tasks] + ["average"]
    width = 0.8 / len(models)
    figure, axes = new_figure(max(6.0, 0.5 * len(labels) * (len(models) + 1)), 4.5)
    for i, model in enumerate(models):
        colour, offset = f"C{i}", (i - (len(models) - 1) / 2) * width
        xs, heights, errors = [], [], []
        for g, task in enumerate(tasks):
            if task in model["tasks"]:
                _, value, stderr = headline(model["tasks"][task])
                xs.append(g + offset)
                heights.append(100 * value)
                errors.append(math.nan if stderr is None else 100 * stderr)
        name = model["name"] + (" (baseline)" if model["name"] == report["baseline"] else "")
        axes.bar(xs, heights, width, yerr=errors, capsize=2, color=colour, label=name)
        if model["average"] is not None:
            x, y, partial = len(tasks) + offset, 100 * model["average"], len(model["tasks"]) < len(tasks)
            axes.bar(
                x,
                y,
                width,
                color=colour,
                hatch="//" if partial else None,
                edgecolor="white" if partial else None,
            )
            if partial:
                axes.annotate(
                    f"{len(model['tasks'])}/{len(tasks)} tasks",
                    (x, y),
                    xytext=(0, 3),
                    textcoords="offset points",
                    ha="center",
                    fontsize=7,
                    rotation=90,
                )
    axes.set_xticks(range(len(labels)), labels)
    axes.set_ylim(0, 100)
    axes.set_ylabel("accuracy (%)")
    axes.set_title("Task accuracy (acc_norm when the task reports it, else acc)")
    axes.grid(True, axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    axes.legend(fontsize=8)
    save_png(figure, path)
    return True
