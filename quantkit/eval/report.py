"""The evaluation report: its JSON schema and checks, and its renderings (rich table, Markdown, plots)."""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

from rich.table import Table
from rich.text import Text

from quantkit.diskspace import check_space, write_errors
from quantkit.errors import QuantkitError
from quantkit.export.atomic import check_writable, staging_beside

REPORT_FORMAT = "quantkit-eval"
REPORT_VERSION = 1
AVERAGE_RULE = (
    "The average takes, per task, acc_norm when the task reports it and acc otherwise, and is the unweighted "
    "mean of these over the tasks, in percent, as QuaRot/FlatQuant/OSTQuant report."
)
MISSING = "—"
PLOT_FILES = ("perplexity_vs_bits.png", "task_accuracy.png")
REPORT_JSON = "report.json"


def headline(metrics: dict) -> tuple[str, float, float | None]:
    """A task's headline metric by :data:`AVERAGE_RULE`: (name, value as a fraction, stderr or None)."""
    for name in ("acc_norm", "acc"):
        if metrics.get(name) is not None:
            return name, metrics[name], metrics.get(f"{name}_stderr")
    raise QuantkitError(f"task metrics {sorted(metrics)} have neither acc nor acc_norm")


def model_average(tasks: dict[str, dict]) -> float | None:
    """The unweighted mean of the tasks' headline metrics (a fraction), or None without tasks."""
    if not tasks:
        return None
    return sum(headline(metrics)[1] for metrics in tasks.values()) / len(tasks)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# kind -> (test, what was expected)
_KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "names": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "count": (lambda v: _integer(v) and v >= 0, "a non-negative integer"),
    "positive_int": (lambda v: _integer(v) and v > 0, "a positive integer"),
    "number": (_number, "a number"),
    "nonnegative": (lambda v: _number(v) and v >= 0, "a non-negative number"),
    "positive": (lambda v: _number(v) and v > 0, "a positive number"),
    "fraction": (lambda v: _number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "batch_size": (lambda v: (_integer(v) and v > 0) or isinstance(v, str), "a positive integer or a string"),
}
# key -> (kind, null allowed, required)
_TOP = {
    "created": ("string", False, True),
    "settings": ("object", False, True),
    "baseline": ("string", True, True),
    "sources": ("object", False, True),
}
_SETTINGS = {
    "seqlen": ("positive_int", False, True),
    "max_windows": ("positive_int", True, True),
    "limit": ("positive", True, True),
    "num_fewshot": ("count", True, True),
    "batch_size": ("batch_size", True, True),
    "kernel": ("string", True, True),
    "data_dir": ("string", True, True),
    "ppl": ("names", False, True),
    "tasks": ("names", False, True),
}
_MODEL = {
    "name": ("string", False, True),
    "quantized": ("bool", False, True),
    "bits_per_weight": ("positive", False, True),
    "size_bytes": ("positive_int", False, True),
    "scheme": ("string", False, True),
    "perplexity": ("object", False, True),
    "tasks": ("object", False, True),
    "average": ("fraction", True, True),
}
_PERPLEXITY = {
    "perplexity": ("positive", True, True),  # null: not finite (a diverged model)
    "nll": ("number", True, False),
    "windows": ("positive_int", False, False),
    "seqlen": ("positive_int", False, False),
    "tokens": ("positive_int", False, False),
}
_TASK = {
    "acc": ("fraction", False, False),
    "acc_stderr": ("nonnegative", True, False),
    "acc_norm": ("fraction", False, False),
    "acc_norm_stderr": ("nonnegative", True, False),
    "samples": ("positive_int", False, False),
}


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(where: str, obj: dict, path: str, fields: dict[str, tuple[str, bool, bool]]) -> None:
    for key, (kind, nullable, required) in fields.items():
        field = f"{path}.{key}" if path else key
        if key not in obj:
            if required:
                raise QuantkitError(f"{where}: {field} is missing")
            continue
        test, expected = _KINDS[kind]
        value = obj[key]
        if not (test(value) or (nullable and value is None)):
            or_null = " or null" if nullable else ""
            raise QuantkitError(f"{where}: {field} is {_shown(value)}, expected {expected}{or_null}")


def _check_object(where: str, value: object, field: str) -> dict:
    if not isinstance(value, dict):
        raise QuantkitError(f"{where}: {field} is {_shown(value)}, expected an object")
    return value


def _check_model(
    where: str, model: object, path: str, settings: dict, metric_of: dict[str, tuple[str, str]]
) -> None:
    """One entry of ``models``; ``metric_of`` (task -> headline metric and where first seen) keeps each task's
    headline metric the same across models."""
    _check_fields(where, _check_object(where, model, path), path, _MODEL)
    for dataset, result in model["perplexity"].items():
        field = f"{path}.perplexity.{dataset}"
        if dataset not in settings["ppl"]:
            raise QuantkitError(f"{where}: {field} is not a dataset of settings.ppl {settings['ppl']}")
        _check_fields(where, _check_object(where, result, field), field, _PERPLEXITY)
    for task, metrics in model["tasks"].items():
        field = f"{path}.tasks.{task}"
        if task not in settings["tasks"]:
            raise QuantkitError(f"{where}: {field} is not a task of settings.tasks {settings['tasks']}")
        _check_fields(where, _check_object(where, metrics, field), field, _TASK)
        if "acc" not in metrics and "acc_norm" not in metrics:
            raise QuantkitError(f"{where}: {field} has neither acc nor acc_norm")
        metric = headline(metrics)[0]
        first_metric, first_field = metric_of.setdefault(task, (metric, field))
        if metric != first_metric:
            raise QuantkitError(
                f"{where}: {field} reports {metric} but {first_field} reports {first_metric}; "
                "they cannot be compared"
            )
    average = model_average(model["tasks"])
    stored = model["average"]
    if (stored is None) != (average is None) or (
        average is not None and not math.isclose(stored, average, rel_tol=1e-9, abs_tol=1e-12)
    ):
        raise QuantkitError(
            f"{where}: {path}.average is {_shown(stored)}, but the tasks give {_shown(average)}"
        )


def check_report(report: dict, where: str) -> None:
    """Raise a one-line :class:`QuantkitError` naming ``where`` and the field where ``report`` breaks the
    schema."""
    if not isinstance(report, dict):
        raise QuantkitError(f"{where}: the report is {type(report).__name__}, expected a JSON object")
    if report.get("format") != REPORT_FORMAT:
        raise QuantkitError(
            f"{where}: format is {_shown(report.get('format'))}, expected {REPORT_FORMAT!r} "
            "(not a quantkit eval report)"
        )
    version = report.get("version")
    if not _integer(version) or version != REPORT_VERSION:
        raise QuantkitError(f"{where}: version is {_shown(version)}, expected {REPORT_VERSION}")
    _check_fields(where, report, "", _TOP)
    _check_fields(where, report["settings"], "settings", _SETTINGS)
    for name, text in report["sources"].items():
        if not isinstance(text, str):
            raise QuantkitError(f"{where}: sources.{name} is {_shown(text)}, expected a string")
    models = report.get("models")
    if not isinstance(models, list) or not models:
        raise QuantkitError(f"{where}: models is {_shown(models)}, expected a non-empty list")
    names: dict[str, int] = {}
    metric_of: dict[str, tuple[str, str]] = {}
    for i, model in enumerate(models):
        _check_model(where, model, f"models[{i}]", report["settings"], metric_of)
        if model["name"] in names:
            raise QuantkitError(
                f"{where}: models[{i}].name {model['name']!r} repeats models[{names[model['name']]}].name"
            )
        names[model["name"]] = i
    if report["baseline"] is not None and report["baseline"] not in names:
        raise QuantkitError(f"{where}: baseline {report['baseline']!r} is not among the models {list(names)}")


def load_report(path: Path) -> dict:
    """Read and check a saved report; any problem is a one-line :class:`QuantkitError` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuantkitError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"{path}: not UTF-8 text, so not a quantkit eval report") from None
    except OSError as exc:
        raise QuantkitError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QuantkitError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
            "is the file truncated?"
        ) from None
    check_report(report, str(path))
    return report


def _signed(value: float, unit: str = "") -> str:
    """``+1.2`` or ``−1.2`` (a true minus sign), one decimal; a value that rounds to zero reads ``+0.0``."""
    text = f"{abs(value):.1f}"
    return ("−" if value < 0 and float(text) != 0 else "+") + text + unit


def _relative(value: float, reference: float) -> str:
    return _signed(100 * (value / reference - 1), "%")


def _points(value: float, reference: float) -> str:
    return _signed(100 * (value - reference))


def _ratio(value: float, reference: float) -> str:
    return f"×{value / reference:.3f}"


def _percent(value: float, stderr: float | None) -> str:
    return f"{100 * value:.1f}" if stderr is None else f"{100 * value:.1f} ± {100 * stderr:.1f}"


_Cell = Callable[[dict], tuple[str, float | None] | None]


def _row(
    models: list[dict], base: dict | None, cell: _Cell, delta: Callable[[float, float], str]
) -> list[str]:
    """One cell per model. ``cell`` gives a model's text and the number compared with the baseline's (None:
    not comparable), or None when the model lacks the entry."""
    reference = cell(base) if base is not None else None
    cells = []
    for model in models:
        got = cell(model)
        if got is None:
            cells.append(MISSING)
            continue
        text, number = got
        if model is not base and reference is not None and number is not None and reference[1] is not None:
            text = f"{text} ({delta(number, reference[1])})"
        cells.append(text)
    return cells


def _sections(report: dict) -> list[list[tuple[str, list[str]]]]:
    """The table's rows as (label, one cell per model), in sections: perplexity, tasks, size."""
    settings, models = report["settings"], report["models"]
    base = next((m for m in models if m["name"] == report["baseline"]), None)

    def ppl(dataset: str) -> _Cell:
        def cell(model: dict) -> tuple[str, float] | None:
            result = model["perplexity"].get(dataset)
            if result is None:
                return None
            value = result["perplexity"]
            return ("not finite", None) if value is None else (f"{value:.2f}", value)

        return cell

    def task(name: str) -> _Cell:
        def cell(model: dict) -> tuple[str, float] | None:
            if name not in model["tasks"]:
                return None
            _, value, stderr = headline(model["tasks"][name])
            return _percent(value, stderr), value

        return cell

    def average(model: dict) -> tuple[str, float | None] | None:
        if model["average"] is None:
            return None
        done = len(model["tasks"])
        if done < len(settings["tasks"]):  # over fewer tasks: not comparable with a full average
            return f"{100 * model['average']:.1f} ({done} of {len(settings['tasks'])} tasks)", None
        return f"{100 * model['average']:.1f}", model["average"]

    sections = [[(f"ppl {d}", _row(models, base, ppl(d), _relative)) for d in settings["ppl"]]]
    if settings["tasks"]:
        metrics = {t: task_metric(models, t) for t in settings["tasks"]}
        rows = [(f"{t} ({metrics[t]})", _row(models, base, task(t), _points)) for t in settings["tasks"]]
        used = "/".join(sorted(set(metrics.values()) - {MISSING}, reverse=True)) or MISSING
        sections.append([*rows, (f"average ({used})", _row(models, base, average, _points))])
    sections.append(
        [
            (
                "bits per weight",
                _row(models, base, lambda m: (f"{m['bits_per_weight']:.3f}", m["bits_per_weight"]), _ratio),
            ),
            (
                "size (MiB)",
                _row(models, base, lambda m: (f"{m['size_bytes'] / 2**20:.1f}", m["size_bytes"]), _ratio),
            ),
            ("scheme", [m["scheme"] for m in models]),
        ]
    )
    return [section for section in sections if section]


def task_metric(models: list[dict], task: str) -> str:
    """The headline metric of ``task`` (the same for every model, as :func:`check_report` ensures), or "—"
    when no model has the task."""
    return next((headline(m["tasks"][task])[0] for m in models if task in m["tasks"]), MISSING)


def _headers(report: dict) -> list[str]:
    return [m["name"] + (" (baseline)" if m["name"] == report["baseline"] else "") for m in report["models"]]


def _title(report: dict) -> str:
    settings = report["settings"]
    windows = f"first {settings['max_windows']} windows" if settings["max_windows"] else "all windows"
    limit = settings["limit"]
    samples = (
        "all samples"
        if limit is None
        else f"first {limit:.0%} of each task"
        if limit < 1
        else f"at most {limit:g} samples per task"
    )
    shots = (
        "the tasks' default shots" if settings["num_fewshot"] is None else f"{settings['num_fewshot']}-shot"
    )
    parts = [f"perplexity at seqlen {settings['seqlen']}, {windows}" if settings["ppl"] else "",
             f"tasks on {samples}, {shots}" if settings["tasks"] else ""]
    return "quantkit eval: " + ("; ".join(p for p in parts if p) or "no measurements")


def report_table(report: dict) -> Table:
    """The report as a rich table: one column per model, with deltas against the baseline if there is one."""
    table = Table(title=_title(report))
    table.add_column("metric")
    for header in _headers(report):
        table.add_column(Text(header), justify="right")
    for i, section in enumerate(_sections(report)):
        if i:
            table.add_section()
        for label, cells in section:
            table.add_row(Text(label), *(Text(cell) for cell in cells))
    return table


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def report_markdown(report: dict) -> str:
    """The report as Markdown: a header (date, settings, baseline, :data:`AVERAGE_RULE`), the table, and the
    sources."""
    settings = ", ".join(f"`{key}={json.dumps(value)}`" for key, value in report["settings"].items())
    baseline = (
        f"`{report['baseline']}`; deltas: perplexity as relative change, accuracies and the average in "
        "percentage points, bits and size as ratios"
        if report["baseline"] is not None
        else "none (no deltas)"
    )
    headers = ["metric", *_headers(report)]
    lines = [
        f"# {_title(report)}",
        "",
        f"- created: {report['created']}",
        f"- settings: {settings}",
        f"- baseline: {baseline}",
        f"- average: {AVERAGE_RULE}",
        "",
        "| " + " | ".join(_md(h) for h in headers) + " |",
        "|:---|" + "---:|" * (len(headers) - 1),
    ]
    for section in _sections(report):
        lines += ["| " + " | ".join(_md(c) for c in [label, *cells]) + " |" for label, cells in section]
    if report["sources"]:
        lines += [
            "",
            "## Sources",
            "",
            *(f"- `{name}`: {_md(text)}" for name, text in report["sources"].items()),
        ]
    return "\n".join(lines) + "\n"


def check_report_dir(directory: Path) -> None:
    """Fail before any work if ``directory`` cannot become (or be written as) a report directory."""
    if directory.exists() and not directory.is_dir():
        raise QuantkitError(f"report path {directory} exists and is not a directory")
    check_writable(directory)


def write_report(report: dict, directory: Path) -> list[Path]:
    """Check ``report``, then write ``report.json``, ``report.md`` and the plots that have something to show
    into ``directory`` (:func:`write_report_files`). Returns the paths written."""
    from quantkit.eval.plots import plot_perplexity_vs_bits, plot_task_accuracy

    check_report(report, str(directory / REPORT_JSON))
    texts = {REPORT_JSON: json.dumps(report, indent=2) + "\n", "report.md": report_markdown(report)}
    plots = {name: functools.partial(plot, report) for name, plot in
             zip(PLOT_FILES, (plot_perplexity_vs_bits, plot_task_accuracy))}
    return write_report_files(directory, texts, plots)


def write_report_files(directory: Path, texts: dict[str, str], plots: dict[str, Callable[[Path], bool]]) -> list[Path]:
    """Write ``texts`` (file name -> content) and the ``plots`` that draw something (file name -> a function
    that draws at a path, False when there is nothing to show) into ``directory``. Every file is staged first
    (see :func:`staging_beside`) and moved into place whole; a plot skipped this time is removed so that no stale
    one remains; a full disk or a denied write is one line. Returns the paths written."""
    needed = sum(len(text.encode("utf-8")) for text in texts.values())
    created = not directory.exists()
    first = directory / next(iter(texts))
    try:
        with write_errors(directory, "the report", needed):
            directory.mkdir(parents=True, exist_ok=True)
            check_space(directory, needed, "the report")
            with staging_beside(first) as staging:
                for name, text in texts.items():
                    (staging / name).write_text(text, encoding="utf-8")
                drawn = [name for name, plot in plots.items() if plot(staging / name)]
                for name in [*texts, *drawn]:
                    os.replace(staging / name, directory / name)
                for name in set(plots) - set(drawn):
                    (directory / name).unlink(missing_ok=True)
                return [directory / name for name in [*texts, *drawn]]
    except BaseException:
        if created and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        raise
