"""The evaluation report: schema checks, table and Markdown cells computed by hand, plots, atomic writing."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from quantkit.errors import QuantkitError
from quantkit.eval import plots
from quantkit.eval.report import (
    AVERAGE_RULE,
    check_report,
    headline,
    load_report,
    model_average,
    report_markdown,
    report_table,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

PIQA_FP = {"acc": 0.672, "acc_stderr": 0.0209, "acc_norm": 0.668, "acc_norm_stderr": 0.021, "samples": 500}
ARC_FP = {"acc": 0.436, "acc_stderr": 0.022, "acc_norm": 0.398, "acc_norm_stderr": 0.0219, "samples": 500}
LAMBADA_FP = {"acc": 0.41, "acc_stderr": 0.022, "perplexity": 18.3, "perplexity_stderr": 1.1, "samples": 500}
PIQA_W4 = {"acc": 0.655, "acc_stderr": 0.0213, "acc_norm": 0.646, "acc_norm_stderr": 0.0214, "samples": 500}
ARC_W4 = {"acc": 0.42, "acc_stderr": 0.0221, "acc_norm": 0.377, "acc_norm_stderr": None, "samples": 500}
LAMBADA_W4 = {
    "acc": 0.352,
    "acc_stderr": 0.0214,
    "perplexity": 27.9,
    "perplexity_stderr": 1.8,
    "samples": 500,
}
PIQA_W3 = {"acc": 0.61, "acc_norm": 0.604, "samples": 500}
ARC_W3 = {"acc": 0.39, "acc_stderr": 0.0218, "acc_norm": 0.35, "acc_norm_stderr": 0.0213, "samples": 500}


def ppl(value: float) -> dict:
    return {"perplexity": value, "nll": 0.0, "windows": 16, "seqlen": 2048, "tokens": 32768}


def make_report() -> dict:
    """Baseline second; w3 lacks lambada_openai and has no stderr on piqa; the averages written by hand."""
    return copy.deepcopy(
        {
            "format": "quantkit-eval",
            "version": 1,
            "created": "2026-11-22T15:10:00Z",
            "settings": {
                "seqlen": 2048,
                "max_windows": None,
                "limit": 500,
                "num_fewshot": 0,
                "batch_size": 16,
                "kernel": None,
                "data_dir": None,
                "ppl": ["wikitext2", "c4"],
                "tasks": ["piqa", "arc_easy", "lambada_openai"],
            },
            "baseline": "fp32",
            "sources": {
                "wikitext2": "local file wiki.test.raw",
                "c4": "local file c4-val.json",
                "piqa": "local files (task local_piqa)",
                "arc_easy": "hub",
                "lambada_openai": "hub",
            },
            "models": [
                {
                    "name": "w4",
                    "quantized": True,
                    "bits_per_weight": 4.25,
                    "size_bytes": 100 * 2**20,
                    "scheme": "int4 g128",
                    "perplexity": {"wikitext2": ppl(26.55), "c4": ppl(30.1)},
                    "tasks": {"piqa": PIQA_W4, "arc_easy": ARC_W4, "lambada_openai": LAMBADA_W4},
                    "average": (0.646 + 0.377 + 0.352) / 3,
                },
                {
                    "name": "fp32",
                    "quantized": False,
                    "bits_per_weight": 32.0,
                    "size_bytes": 538090408,
                    "scheme": "float32",
                    "perplexity": {"wikitext2": ppl(20.82), "c4": ppl(22.0)},
                    "tasks": {"piqa": PIQA_FP, "arc_easy": ARC_FP, "lambada_openai": LAMBADA_FP},
                    "average": (0.668 + 0.398 + 0.41) / 3,
                },
                {
                    "name": "w3",
                    "quantized": True,
                    "bits_per_weight": 3.125,
                    "size_bytes": 80 * 2**20,
                    "scheme": "int3 g128",
                    "perplexity": {"wikitext2": ppl(35.0)},
                    "tasks": {"piqa": PIQA_W3, "arc_easy": ARC_W3},
                    "average": (0.604 + 0.35) / 2,
                },
            ],
        }
    )


def rendered(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def markdown_row(markdown: str, label: str) -> list[str]:
    """The cells of the Markdown table row whose first cell is ``label``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in\n{markdown}")


def test_headline_prefers_acc_norm_and_falls_back_to_acc() -> None:
    assert headline(PIQA_FP) == ("acc_norm", 0.668, 0.021)
    assert headline(LAMBADA_FP) == ("acc", 0.41, 0.022)
    assert headline(PIQA_W3) == ("acc_norm", 0.604, None)
    with pytest.raises(QuantkitError, match="neither acc nor acc_norm"):
        headline({"perplexity": 3.0})


def test_model_average_by_hand() -> None:
    assert model_average({"piqa": PIQA_FP, "lambada_openai": LAMBADA_FP}) == pytest.approx((0.668 + 0.41) / 2)
    assert model_average({"lambada_openai": LAMBADA_FP}) == pytest.approx(0.41)
    assert model_average({}) is None
    assert "acc_norm" in AVERAGE_RULE and "QuaRot/FlatQuant/OSTQuant" in AVERAGE_RULE


def test_write_load_round_trip_markdown_table_and_plots(tmp_path: Path) -> None:
    report = make_report()
    written = write_report(report, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == ["perplexity_vs_bits.png", "report.json", "report.md", "task_accuracy.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    assert load_report(tmp_path / "out" / "report.json") == report

    md = (tmp_path / "out" / "report.md").read_text()
    assert md == report_markdown(report)
    header = next(line for line in md.splitlines() if line.startswith("| metric"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["metric", "w4", "fp32 (baseline)", "w3"]
    # perplexity: relative change against the baseline
    assert markdown_row(md, "ppl wikitext2") == [
        f"26.55 (+{100 * (26.55 / 20.82 - 1):.1f}%)",
        "20.82",
        f"35.00 (+{100 * (35.0 / 20.82 - 1):.1f}%)",
    ]
    assert markdown_row(md, "ppl c4") == [f"30.10 (+{100 * (30.1 / 22.0 - 1):.1f}%)", "22.00", "—"]
    # accuracies in percent ± stderr, deltas in points with a true minus sign
    assert markdown_row(md, "piqa (acc_norm)") == ["64.6 ± 2.1 (−2.2)", "66.8 ± 2.1", "60.4 (−6.4)"]
    assert markdown_row(md, "arc_easy (acc_norm)") == ["37.7 (−2.1)", "39.8 ± 2.2", "35.0 ± 2.1 (−4.8)"]
    assert markdown_row(md, "lambada_openai (acc)") == ["35.2 ± 2.1 (−5.8)", "41.0 ± 2.2", "—"]
    # average of the headline values; w3's is over two tasks, so it carries no delta
    avg_fp, avg_w4, avg_w3 = (66.8 + 39.8 + 41.0) / 3, (64.6 + 37.7 + 35.2) / 3, (60.4 + 35.0) / 2
    assert markdown_row(md, "average (acc_norm/acc)") == [
        f"{avg_w4:.1f} (−{avg_fp - avg_w4:.1f})",
        f"{avg_fp:.1f}",
        f"{avg_w3:.1f} (2 of 3 tasks)",
    ]
    assert markdown_row(md, "bits per weight") == [
        f"4.250 (×{4.25 / 32:.3f})",
        "32.000",
        f"3.125 (×{3.125 / 32:.3f})",
    ]
    assert markdown_row(md, "size (MiB)") == [
        f"100.0 (×{100 * 2**20 / 538090408:.3f})",
        f"{538090408 / 2**20:.1f}",
        f"80.0 (×{80 * 2**20 / 538090408:.3f})",
    ]
    assert "- created: 2026-11-22T15:10:00Z" in md and AVERAGE_RULE in md and "`seqlen=2048`" in md
    assert "- `c4`: local file c4-val.json" in md

    table = report_table(report)
    for words in ["seqlen 2048", "all windows", "at most 500 samples per task", "0-shot"]:
        assert words in table.title
    text = rendered(table)
    for cell in [
        "fp32 (baseline)",
        "26.55 (+27.5%)",
        "64.6 ± 2.1 (−2.2)",
        "60.4 (−6.4)",
        "47.7 (2 of 3 tasks)",
        "4.250 (×0.133)",
    ]:
        assert cell in text

    from PIL import Image

    for name in ["perplexity_vs_bits.png", "task_accuracy.png"]:
        path = tmp_path / "out" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        with Image.open(path) as image:
            image.load()
            assert image.width > 100 and image.height > 100


def test_render_from_saved_json_alone_in_a_fresh_interpreter(tmp_path: Path) -> None:
    write_report(make_report(), tmp_path)
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from rich.console import Console
        from quantkit.eval.report import load_report, report_markdown, report_table
        heavy = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
        assert not heavy, heavy
        report = load_report(Path({str(tmp_path / "report.json")!r}))
        console = Console(record=True, width=200)
        console.print(report_table(report))
        print(report_markdown(report))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "26.55 (+27.5%)" in done.stdout and "| piqa (acc_norm) |" in done.stdout


def test_no_plots_without_perplexity_or_tasks(tmp_path: Path) -> None:
    report = make_report()
    report["settings"]["ppl"], report["settings"]["tasks"] = [], []
    for model in report["models"]:
        model["perplexity"], model["tasks"], model["average"] = {}, {}, None
    (tmp_path / "task_accuracy.png").write_bytes(b"stale")  # from an earlier report in the same directory
    assert sorted(p.name for p in write_report(report, tmp_path)) == ["report.json", "report.md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    assert "| bits per weight |" in (tmp_path / "report.md").read_text()


def test_without_baseline_there_are_no_deltas() -> None:
    report = make_report()
    report["baseline"] = None
    md = report_markdown(report)
    assert markdown_row(md, "ppl wikitext2") == ["26.55", "20.82", "35.00"]
    assert markdown_row(md, "piqa (acc_norm)") == ["64.6 ± 2.1", "66.8 ± 2.1", "60.4"]
    assert "(baseline)" not in md


def test_failing_plot_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(report: dict, path: Path) -> bool:
        path.write_bytes(b"\x89PNG half")
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_task_accuracy", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="plot failed"):
        write_report(make_report(), out)
    assert not out.exists()  # the directory it created is gone again


def test_failing_plot_keeps_the_previous_report_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_report(make_report(), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    changed = make_report()
    changed["created"] = "2027-01-01T00:00:00Z"

    def broken(report: dict, path: Path) -> bool:
        raise RuntimeError("plot failed")

    monkeypatch.setattr(plots, "plot_perplexity_vs_bits", broken)
    with pytest.raises(RuntimeError):
        write_report(changed, tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def broken_report(change) -> dict:
    report = make_report()
    change(report)
    return report


def set_key(keys: tuple, value):
    def change(report: dict) -> None:
        target = report
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (set_key(("format",), "lm-eval"), "format is 'lm-eval', expected 'quantkit-eval'"),
        (set_key(("version",), 2), "version is 2, expected 1"),
        (
            set_key(("models", 1, "tasks", "piqa", "acc"), "x"),
            "models[1].tasks.piqa.acc is 'x', expected a number",
        ),
        (
            set_key(("models", 0, "perplexity", "c4", "perplexity"), float("nan")),
            "models[0].perplexity.c4.perplexity is nan, expected a positive number",
        ),
        (set_key(("baseline",), "fp16"), "baseline 'fp16' is not among the models ['w4', 'fp32', 'w3']"),
        (lambda r: r["models"][2].pop("bits_per_weight"), "models[2].bits_per_weight is missing"),
        (set_key(("settings", "seqlen"), "2048"), "settings.seqlen is '2048', expected a positive integer"),
        (set_key(("models", 0, "average"), 0.9), "models[0].average is 0.9, but the tasks give"),
        (set_key(("models", 2, "name"), "w4"), "models[2].name 'w4' repeats models[0].name"),
        (
            set_key(("models", 0, "tasks", "hellaswag"), PIQA_FP),
            "models[0].tasks.hellaswag is not a task of settings.tasks",
        ),
        (
            lambda r: r["models"][1]["tasks"]["piqa"].pop("acc_norm"),
            "models[1].tasks.piqa reports acc but models[0].tasks.piqa reports acc_norm",
        ),
    ],
)
def test_check_report_names_the_file_and_the_field(tmp_path: Path, change, message: str) -> None:
    report = broken_report(change)
    with pytest.raises(QuantkitError) as direct:
        check_report(report, "report.json")
    assert str(direct.value).startswith("report.json: ") and message in str(direct.value)
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    with pytest.raises(QuantkitError) as loaded:
        load_report(path)
    assert str(loaded.value) == str(direct.value).replace("report.json", str(path), 1)
    assert "\n" not in str(loaded.value)


def test_load_report_refuses_missing_and_truncated_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(QuantkitError, match=r"nope\.json: no such file"):
        load_report(missing)
    truncated = tmp_path / "report.json"
    truncated.write_text(json.dumps(make_report(), indent=2)[:300])
    with pytest.raises(QuantkitError) as error:
        load_report(truncated)
    assert str(error.value).startswith(f"{truncated}: invalid JSON at line ") and "\n" not in str(error.value)
    truncated.write_text("[1, 2]")
    with pytest.raises(QuantkitError, match="the report is list, expected a JSON object"):
        load_report(truncated)
