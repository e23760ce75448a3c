"""Zero-shot accuracy through lm-evaluation-harness, scoring the model already in memory (quantized layers are
served by quantkit's kernels, not reloaded by the harness)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from quantkit.errors import QuantkitError, one_line
from quantkit.hub import data_unreachable
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


@dataclass
class TaskPlan:
    """The tasks of one evaluation and the harness's task index that resolves them (built once per run)."""

    specs: list[TaskSpec]
    data_dir: str | None
    manager: object = None

    def task_manager(self):
        """lm-eval's index: quantkit's local configs, plus the built-in tasks only when one is asked for
        (indexing them takes seconds)."""
        if self.manager is None:
            from lm_eval.tasks import TaskManager

            from quantkit.eval.tasks.loaders import TASKS_DIR

            local = any(s.local for s in self.specs)
            self.manager = TaskManager(include_path=str(TASKS_DIR) if local else None,
                                       include_defaults=not all(s.local for s in self.specs),
                                       metadata={"data_dir": str(self.data_dir)} if self.data_dir else None)
        return self.manager


def plan_tasks(tasks: list[str], data_dir: str | None, num_fewshot: int = 0) -> TaskPlan:
    """Local task configs (reading ``data_dir``) for the tasks quantkit has them for when a data directory is
    given; lm-eval's built-in tasks (their data from the hub) otherwise. Checked before any model loads: local
    files exist, built-in names are single tasks (not groups or tags, whose results the report cannot hold)."""
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
    local_names = [s.name for s in specs if s.local]
    if local_names and num_fewshot:
        raise QuantkitError(f"--num-fewshot {num_fewshot} with local tasks ({', '.join(local_names)}): their files "
                            "hold only the evaluated split, so the examples would come from it; use 0")
    plan = TaskPlan(specs, data_dir)
    hub = [s.name for s in specs if not s.local]
    if hub:
        manager = plan.task_manager()
        for name in hub:
            if name in manager.all_groups or name in manager.all_tags:
                raise QuantkitError(f"--tasks {name} is an lm-eval group or tag; name its tasks one by one")
            if name not in manager.all_subtasks:
                raise QuantkitError(f"unknown lm-eval task {name!r}")
        _check_hub(hub)
    return plan


def _check_hub(tasks: list[str]) -> None:
    """Tasks whose data comes from the hub fail at once when it cannot be reached (see
    :func:`quantkit.hub.data_unreachable`)."""
    from quantkit.eval.tasks.loaders import LOCAL_TASKS

    reason = data_unreachable()
    if reason:
        local = [name for name in tasks if name in LOCAL_TASKS]
        hint = f"; {', '.join(local)} can run from local files with --data-dir" if local else ""
        raise QuantkitError(f"--tasks {', '.join(tasks)} read their data from the hub, which cannot be reached "
                            f"({reason}){hint}")


def _harness_model(model: nn.Module, tokenizer, batch_size: int, label: str):
    """lm-eval's Hugging Face wrapper around ``model``, with a progress display (headed ``label``) over its
    requests."""
    from lm_eval.models.huggingface import HFLM

    class ProgressLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            with progress_bar(transient=True) as progress:
                self._progress = (progress, progress.add_task(f"{label}: zero-shot requests", total=len(requests)))
                try:
                    scores = super().loglikelihood(requests, disable_tqdm=True)
                    progress.update(self._progress[1], completed=len(requests))  # shared contexts run once
                    return scores
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


def evaluate_tasks(model: nn.Module, tokenizer, plan: TaskPlan, limit: int | None, batch_size: int,
                   num_fewshot: int = 0, label: str = "model") -> dict[str, dict]:
    """Score ``model`` (called ``label`` in the progress display) on every task; returns
    ``name -> {acc, acc_stderr, acc_norm, …, samples}``."""
    import lm_eval

    from quantkit.eval.tasks.loaders import LOCAL_TASKS

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    specs = plan.specs
    try:
        output = lm_eval.simple_evaluate(
            model=_harness_model(model, tokenizer, batch_size, label), tasks=[s.harness_task for s in specs],
            num_fewshot=num_fewshot, limit=limit, task_manager=plan.task_manager(), log_samples=False,
        )
        results, counts = output["results"], output["n-samples"]
        return {s.name: _metrics(results[s.harness_task], counts[s.harness_task]["effective"]) for s in specs}
    except QuantkitError:
        raise
    except Exception as exc:  # the harness's own failures (an unreachable hub, a bad config) in one line
        first = one_line(exc)[:300]
        local = [s.name for s in specs if not s.local and s.name in LOCAL_TASKS]
        hint = f" ({', '.join(local)} can run from local files: pass --data-dir)" if local else ""
        raise QuantkitError(f"lm-eval could not run {', '.join(s.name for s in specs)}: {first}{hint}") from None
