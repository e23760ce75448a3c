"""Zero-shot accuracy through lm-evaluation-harness on tiny local tasks, against an independent scoring of the
same model; the CLI report end to end; and agreement with the plain `lm_eval` command."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_cli

import quantkit
from quantkit.api import CalibrationSpec, quantize
from quantkit.eval.zeroshot import KEPT_METRICS, evaluate_tasks, plan_tasks
from quantkit.models.loading import load_model
from quantkit.schemes import QuantScheme

PIQA = [
    ("Keep a door open", "Put a wedge under it.", "Paint it blue.", 0),
    ("Boil water", "Heat it in a kettle.", "Put it in the freezer.", 0),
    ("Dry wet hands", "Wave them in a pond.", "Rub them with a towel.", 1),
    ("Cut paper", "Use scissors.", "Use a spoon.", 0),
    ("Light a dark room", "Close the curtains.", "Switch on a lamp.", 1),
    ("Keep bread fresh", "Seal it in a bag.", "Leave it in the sun.", 0),
]
LAMBADA = [
    ("The quick brown fox jumps over the lazy", "dog"),
    ("Calibration text is cut into windows of", "tokens"),
    ("Post-training quantization maps the weights of a language model to a few", "bits"),
    ("She opened the door and saw the", "garden"),
]


@pytest.fixture(scope="module")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data directory laid out like ../shared/data with a few PIQA and LAMBADA examples."""
    root = tmp_path_factory.mktemp("tasks")
    (root / "piqa").mkdir()
    (root / "piqa" / "valid.jsonl").write_text(
        "".join(json.dumps({"goal": g, "sol1": a, "sol2": b}) + "\n" for g, a, b, _ in PIQA))
    (root / "piqa" / "valid-labels.lst").write_text("".join(f"{label}\n" for *_, label in PIQA))
    (root / "lambada_openai").mkdir()
    (root / "lambada_openai" / "lambada_openai.jsonl").write_text(
        "".join(json.dumps({"context": c, "continuation": w}) + "\n" for c, w in LAMBADA))
    return root


def continuation_logprobs(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """Sum of log p(continuation | context) and whether greedy decoding gives it: lm-eval's definition, with the
    continuation's tokens taken as those the whole string adds to the context's."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), dim=-1)
    targets = ids[0, n_context:]
    rows = logprobs[n_context - 1:]
    return rows.gather(1, targets[:, None]).sum().item(), bool((rows.argmax(-1) == targets).all())


def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def expected_piqa(model, tokenizer) -> dict[str, float]:
    acc, acc_norm = [], []
    for goal, sol1, sol2, label in PIQA:
        context = f"Question: {goal}\nAnswer:"
        lls = [continuation_logprobs(model, tokenizer, context, " " + s)[0] for s in (sol1, sol2)]
        acc.append(float(max(range(2), key=lambda i: lls[i]) == label))
        normed = [ll / len(s) for ll, s in zip(lls, (sol1, sol2))]
        acc_norm.append(float(max(range(2), key=lambda i: normed[i]) == label))
    (a, a_err), (n, n_err) = mean_and_stderr(acc), mean_and_stderr(acc_norm)
    return {"acc": a, "acc_stderr": a_err, "acc_norm": n, "acc_norm_stderr": n_err}


def expected_lambada(model, tokenizer) -> dict[str, float]:
    scored = [continuation_logprobs(model, tokenizer, c, " " + w) for c, w in LAMBADA]
    acc, acc_err = mean_and_stderr([float(greedy) for _, greedy in scored])
    return {"acc": acc, "acc_stderr": acc_err, "perplexity": math.exp(-sum(ll for ll, _ in scored) / len(scored))}


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "w4"
    quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 32, True),
             calibration=CalibrationSpec(str(calib_file), 2, 16), output=out)
    return out


@pytest.mark.parametrize("served", ["float", "quantized"])
def test_tiny_local_tasks_score_the_model_as_an_independent_scorer_does(
        served: str, tiny_model_dir: Path, quantized_dir: Path, task_data: Path) -> None:
    if served == "float":
        loaded = load_model(str(tiny_model_dir))
        model, tokenizer = loaded.model, loaded.tokenizer
    else:
        model, tokenizer = quantkit.load(quantized_dir, kernel="cpu"), quantkit.load_tokenizer(quantized_dir)
    plan = plan_tasks(["piqa", "lambada_openai"], str(task_data))
    assert [s.harness_task for s in plan.specs] == ["local_piqa", "local_lambada_openai"]
    assert all(s.local for s in plan.specs)
    scores = evaluate_tasks(model, tokenizer, plan, limit=None, batch_size=3)
    assert scores["piqa"]["samples"] == len(PIQA) and scores["lambada_openai"]["samples"] == len(LAMBADA)
    for task, expected in (("piqa", expected_piqa(model, tokenizer)), ("lambada_openai", expected_lambada(model, tokenizer))):
        for metric, value in expected.items():
            assert scores[task][metric] == pytest.approx(value, rel=1e-5, abs=1e-9), (task, metric)
    limited = evaluate_tasks(model, tokenizer, plan_tasks(["piqa"], str(task_data)), limit=2, batch_size=1)
    assert limited["piqa"]["samples"] == 2


def test_eval_cli_writes_a_report_that_renders_again_without_models(
        tiny_model_dir: Path, quantized_dir: Path, task_data: Path, calib_file: Path, tmp_path: Path) -> None:
    report = tmp_path / "report"
    proc = run_cli("eval", str(quantized_dir), str(tiny_model_dir), "--tasks", "piqa,lambada_openai",
                   "--ppl", str(calib_file), "--seqlen", "64", "--data-dir", str(task_data), "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((report / "report.json").read_text())
    assert saved["baseline"] == str(tiny_model_dir)  # the one unquantized model among several
    assert [m["name"] for m in saved["models"]] == [str(quantized_dir), str(tiny_model_dir)]
    quantized, base = saved["models"]
    assert quantized["bits_per_weight"] < 6 and base["bits_per_weight"] == 32
    assert set(quantized["tasks"]) == {"piqa", "lambada_openai"}
    assert quantized["average"] == pytest.approx((quantized["tasks"]["piqa"]["acc_norm"]
                                                  + quantized["tasks"]["lambada_openai"]["acc"]) / 2)
    assert "local_piqa" in saved["sources"]["piqa"]
    assert {p.name for p in report.iterdir()} == {"report.json", "report.md", "perplexity_vs_bits.png",
                                                  "task_accuracy.png"}
    again = tmp_path / "again"
    rendered = run_cli("report", str(report / "report.json"), "-o", str(again))
    assert rendered.returncode == 0, rendered.stderr
    assert (again / "report.md").read_text() == (report / "report.md").read_text()
    assert "piqa (acc_norm)" in rendered.stdout


def test_eval_cli_refuses_missing_task_files_before_loading(tiny_model_dir: Path, task_data: Path,
                                                            tmp_path: Path) -> None:
    report = tmp_path / "r"
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--tasks", "piqa", "--data-dir", str(task_data),
                                  "--num-fewshot", "2", "--report", str(report)), "--num-fewshot 2 with local tasks")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--tasks", "piqa", "--data-dir", str(tmp_path),
                                  "--report", str(report)), "local_piqa", "piqa/valid.jsonl")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--tasks", "piqa,piqa", "--data-dir", str(tmp_path)),
                          "names a task twice")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--tasks", "piqa", "--limit", "0"),
                          "'--limit': Input should be greater than or equal to 1")
    assert_one_line_error(run_cli("report", str(tmp_path / "missing.json")), "missing.json")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), str(tiny_model_dir), "--report", str(report)),
                          "named twice")
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--report", str(afile)), "is not a directory")
    assert not report.exists() and afile.read_text() == "x"


@pytest.mark.parametrize("task,fragments", [
    ("no_such_task_xyz", ["unknown lm-eval task 'no_such_task_xyz'"]),
    ("ai2_arc", ["ai2_arc is an lm-eval group or tag"]),
    ("piqa", ["--tasks piqa read their data from the hub, which cannot be reached (HF_HUB_OFFLINE=1)",
              "piqa can run from local files with --data-dir"]),
])
def test_hub_tasks_offline_fail_in_one_line(task: str, fragments: list[str], tiny_model_dir: Path,
                                            tmp_path: Path) -> None:
    assert_one_line_error(run_cli("eval", str(tiny_model_dir), "--tasks", task, "--report", str(tmp_path / "r")),
                          *fragments)
    assert not (tmp_path / "r").exists()


def lm_eval_direct(pretrained: Path, tasks: list[str], data_dir: Path, out: Path, limit: int | None,
                   batch_size: int) -> dict[str, dict]:
    """Metrics of the plain `lm_eval` command on quantkit's local task configs (``tasks`` as quantkit names)."""
    from quantkit.eval.tasks.loaders import LOCAL_TASKS, TASKS_DIR

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={pretrained},dtype=float32",
               "--device", "cpu", "--batch_size", str(batch_size), "--include_path", str(TASKS_DIR),
               "--tasks", ",".join(LOCAL_TASKS[t].task_name for t in tasks),
               "--metadata", json.dumps({"data_dir": str(data_dir)}), "--output_path", str(out)]
    proc = subprocess.run(command + (["--limit", str(limit)] if limit else []), capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = out.rglob("results_*.json")
    results = json.loads(path.read_text())["results"]
    return {t: results[LOCAL_TASKS[t].task_name] for t in tasks}


def assert_same_numbers(ours: dict[str, dict], theirs: dict[str, dict]) -> None:
    """Every acc/acc_norm/perplexity and standard error the harness reports, equal to the bit in ours."""
    assert ours.keys() == theirs.keys()
    for task, metrics in theirs.items():
        kept = {k.removesuffix(",none") for k in metrics if k.split("_stderr")[0].split(",")[0] in KEPT_METRICS}
        assert kept and kept == set(ours[task]) - {"samples"}, task
        for metric in kept:
            harness = metrics[f"{metric},none"]
            assert ours[task][metric] == (None if harness == "N/A" else harness), (task, metric)


def test_local_tasks_give_the_numbers_of_lm_eval_run_directly(tiny_model_dir: Path, task_data: Path,
                                                              tmp_path: Path) -> None:
    tasks = ["piqa", "lambada_openai"]
    loaded = load_model(str(tiny_model_dir))
    ours = evaluate_tasks(loaded.model, loaded.tokenizer, plan_tasks(tasks, str(task_data)), limit=None,
                          batch_size=2)
    assert_same_numbers(ours, lm_eval_direct(tiny_model_dir, tasks, task_data, tmp_path / "out", None, 2))


def test_a_diverged_model_is_reported_not_lost(tmp_path: Path, calib_file: Path, tiny_model_dir: Path) -> None:
    from conftest import tiny_model
    from helpers_tokenizer import tiny_tokenizer

    broken = tmp_path / "broken"
    model = tiny_model()
    model.lm_head.weight[0] = 3e38  # finite weights whose logits overflow
    model.save_pretrained(broken)
    tiny_tokenizer().save_pretrained(broken)
    report = tmp_path / "r"
    proc = run_cli("eval", str(tiny_model_dir), str(broken), "--ppl", str(calib_file), "--seqlen", "32",
                   "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((report / "report.json").read_text())
    assert saved["models"][0]["perplexity"][str(calib_file)]["perplexity"] > 1
    assert saved["models"][1]["perplexity"][str(calib_file)]["perplexity"] is None
    assert "not finite" in (report / "report.md").read_text()
