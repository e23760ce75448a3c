"""Zero-shot accuracy through lm-evaluation-harness, scoring the model already in memory (quantized layers are
served by quantkit's kernels, not reloaded by the harness)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.progress import progress_bar

STANDARD_TASKS = ("piqa", "hellaswag", "arc_easy", "arc_challenge", "winogrande", "lambada_openai")
KEPT_METRICS = ("acc", "acc_norm", "perplexity")  # with their standard errors


@dataclass(frozen=True)
class TaskSpec:
    """A task as the report names it, the lm-eval task that runs it, and where its data comes from."""

    name: str
    harness_task: str
    source: str
    local: bool


def task_specs(tasks: list[str], data_dir: str | None) -> list[TaskSpec]:
    """Local task configs (reading ``data_dir``) for the tasks quantkit has them for when a data directory is
    given; lm-eval's built-in tasks (their data from the hub) otherwise."""
    from quantkit.eval.tasks.loaders import LOCAL_TASKS, check_local_files

    if len(set(tasks)) != len(tasks):
        raise QuantkitError(f"--tasks names a task twice: {', '.join(tasks)}")
    specs = []
    for name in tasks:
        local = LOCAL_TASKS.get(name)
        if data_dir is not None and local is not None:
            check_local_files(name, Path(data_dir))
            source = f"local files in {data_dir} (quantkit task {local.task_name}; against the hub task: {local.differs})"
            specs.append(TaskSpec(name, local.task_name, source, True))
        else:
            specs.append(TaskSpec(name, name, f"lm-eval built-in task {name} (data from the hub)", False))
    return specs


def _harness_model(model: nn.Module, tokenizer, batch_size: int):
    """lm-eval's Hugging Face wrapper around ``model``, with a rich progress bar over its requests."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            with progress_bar(transient=True) as progress:
                self._progress = (progress, progress.add_task("zero-shot requests", total=len(requests)))
                try:
                    return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
                finally:
                    del self._progress

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask, labels)
            if getattr(self, "_progress", None) is not None:
                progress, task = self._progress
                progress.advance(task, inps.shape[0])
            return logits

    return ProgressLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))


def _metrics(raw: dict, samples: int) -> dict:
    """``acc``, ``acc_norm``, ``perplexity`` and their standard errors (None where lm-eval has none)."""
    out: dict[str, object] = {}
    for metric in KEPT_METRICS:
        if f"{metric},none" not in raw:
            continue
        out[metric] = float(raw[f"{metric},none"])
        stderr = raw.get(f"{metric}_stderr,none")
        out[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, int | float) and math.isfinite(stderr) else None
    out["samples"] = samples
    return out


def evaluate_tasks(model: nn.Module, tokenizer, specs: list[TaskSpec], data_dir: str | None,
                   limit: int | None, batch_size: int, num_fewshot: int = 0) -> dict[str, dict]:
    """Score ``model`` on every task; returns ``name -> {acc, acc_stderr, acc_norm, …, samples}``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from quantkit.eval.tasks.loaders import TASKS_DIR

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    include = str(TASKS_DIR) if any(s.local for s in specs) else None
    manager = TaskManager(include_path=include, include_defaults=not all(s.local for s in specs),
                          metadata={"data_dir": str(data_dir)} if data_dir else None)
    try:
        output = lm_eval.simple_evaluate(
            model=_harness_model(model, tokenizer, batch_size), tasks=[s.harness_task for s in specs],
            num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False, verbosity="ERROR",
        )
    except QuantkitError:
        raise
    except Exception as exc:  # the harness's own failures (an unreachable hub, a bad task name) in one line
        first = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise QuantkitError(f"lm-eval could not run {', '.join(s.name for s in specs)}: {first}") from None
    results, counts = output["results"], output["n-samples"]
    return {s.name: _metrics(results[s.harness_task], counts[s.harness_task]["effective"]) for s in specs}
