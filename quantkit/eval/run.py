"""``quantkit eval``: perplexity of one or more models (and a baseline) on named or local text."""

from __future__ import annotations

from dataclasses import dataclass, field

from quantkit.eval.models import load_target
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.models.loading import check_model_exists
from quantkit.textsources import load_eval_text


@dataclass
class EvalRequest:
    targets: list[str]
    datasets: list[str]
    seqlen: int = 2048
    max_windows: int | None = None
    baseline: str | None = None
    data_dir: str | None = None
    kernel: str | None = None


@dataclass
class EvalReport:
    request: EvalRequest
    # model name -> dataset -> result dict
    results: dict[str, dict[str, dict]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


def run_eval(request: EvalRequest) -> EvalReport:
    """Evaluate the baseline (if any) and every target on every dataset, one model in memory at a time."""
    report = EvalReport(request)
    names = ([request.baseline] if request.baseline else []) + list(request.targets)
    for name in names:
        check_model_exists(name)
    texts = {}
    for dataset in request.datasets:
        texts[dataset], report.sources[dataset] = load_eval_text(dataset, request.data_dir)
    for name in names:
        target = load_target(name, request.kernel)
        report.results[name] = {}
        for dataset, text in texts.items():
            stream = tokenize_stream(text, target.tokenizer)
            result = perplexity(target.model, stream, request.seqlen, request.max_windows, dataset)
            report.results[name][dataset] = result.to_dict()
        del target
    return report
