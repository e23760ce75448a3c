"""``quantkit eval``: perplexity and zero-shot accuracy of one or more models, gathered into one report."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timezone

from quantkit.errors import QuantkitError
from quantkit.eval.models import EvalTarget, load_target
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.eval.report import REPORT_FORMAT, REPORT_VERSION, model_average
from quantkit.models.loading import check_context, check_model_exists, stored_bytes
from quantkit.runtime.loader import is_quantkit_checkpoint
from quantkit.textsources import load_eval_text, resolve_data_dir


@dataclass
class EvalRequest:
    targets: list[str]
    datasets: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    seqlen: int = 2048
    max_windows: int | None = None
    baseline: str | None = None
    data_dir: str | None = None
    kernel: str | None = None
    limit: int | None = None
    batch_size: int = 8
    num_fewshot: int = 0

    def models(self) -> list[str]:
        """Every model to evaluate, in the order given; a baseline named only by ``baseline`` comes first."""
        return list(self.targets) if self.baseline in self.targets or not self.baseline else \
            [self.baseline, *self.targets]

    def chosen_baseline(self) -> str | None:
        """The baseline named, else the one unquantized model among several (e.g. the original of checkpoints)."""
        if self.baseline:
            return self.baseline
        models = self.models()
        unquantized = [m for m in models if not is_quantkit_checkpoint(m)]
        return unquantized[0] if len(models) > 1 and len(unquantized) == 1 else None


def _describe(target: EvalTarget) -> dict[str, object]:
    """Bits per weight, size and scheme of a model as stored."""
    if target.quantized:
        from quantkit.checkpoint_info import inspect_checkpoint

        info = inspect_checkpoint(target.name)
        return {"bits_per_weight": info.bits_per_weight, "size_bytes": info.file_bytes,
                "scheme": ", ".join(s.scheme for s in info.schemes)}
    dtype = target.stored_dtype or next(target.model.parameters()).dtype  # as stored, not as evaluated
    return {"bits_per_weight": float(dtype.itemsize * 8), "size_bytes": stored_bytes(target.model, dtype),
            "scheme": f"{str(dtype).removeprefix('torch.')} (unquantized)"}


def _finite(result: dict) -> dict:
    """A perplexity result with non-finite numbers (a diverged model) as null, which JSON can hold."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in result.items()}


def run_eval(request: EvalRequest) -> dict:
    """Evaluate every model on every perplexity set and task, one model in memory at a time; the report dict
    (schema in :mod:`quantkit.eval.report`)."""
    from quantkit.eval.zeroshot import evaluate_tasks, plan_tasks

    names = request.models()
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise QuantkitError(f"{repeated[0]} is named twice among the models to evaluate")
    for name in names:
        check_model_exists(name)
    folder = resolve_data_dir(request.data_dir)
    data_dir = str(folder) if folder is not None else None
    plan = plan_tasks(request.tasks, data_dir, request.num_fewshot)
    specs = plan.specs
    texts, sources = {}, {}
    for dataset in request.datasets:
        texts[dataset], sources[dataset] = load_eval_text(dataset, data_dir)
    sources |= {spec.name: spec.source for spec in specs}
    models = []
    for name in names:
        target = load_target(name, request.kernel)
        if texts:
            check_context(target.model, request.seqlen, "--seqlen")
        entry: dict[str, object] = {"name": name, "quantized": target.quantized, **_describe(target)}
        entry["perplexity"] = {
            dataset: _finite(perplexity(target.model, tokenize_stream(text, target.tokenizer), request.seqlen,
                                        request.max_windows, dataset, label=name).to_dict())
            for dataset, text in texts.items()
        }
        entry["tasks"] = evaluate_tasks(target.model, target.tokenizer, plan, request.limit, request.batch_size,
                                        request.num_fewshot, label=name) if specs else {}
        entry["average"] = model_average(entry["tasks"])
        models.append(entry)
        del target
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "settings": {"seqlen": request.seqlen, "max_windows": request.max_windows, "limit": request.limit,
                     "num_fewshot": request.num_fewshot, "batch_size": request.batch_size,
                     "kernel": request.kernel, "data_dir": data_dir, "ppl": list(request.datasets),
                     "tasks": list(request.tasks)},
        "baseline": request.chosen_baseline(),
        "sources": sources,
        "models": models,
    }
