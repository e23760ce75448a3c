#!/usr/bin/env python
"""Transforms benchmark: SmolLM2-135M perplexity with no transform, hadamard, flatquant and ostquant, each
under RTN and GPTQ weights, for W4A16, W4A4 (INT4 per-token activations) and W4A4 NVFP4; with the time
each transform took to build or train.

Protocol: INT4 weights are per-channel symmetric (the rotation papers' setting), NVFP4 weights use their
format's blocks; activations are dynamic per token (INT4 symmetric, one scale per token; NVFP4 blocks of 16).
GPTQ (act-order) calibrates on 64 windows x 512 tokens of the C4 validation parquet (seed 0); flatquant and
ostquant train on C4 windows with their CPU budgets (see quantkit.transforms). Perplexity: the first 3
windows x 2048 tokens of WikiText-2 test (3/16 of the issue #2 protocol, to fit the 24 runs in about 80
minutes on 2 cores). A trained transform is trained once per setting and shared by RTN and GPTQ. Everything runs
in this process; the report is saved after every row.

    python scripts/bench_transforms.py                 # the full table
    python scripts/bench_transforms.py --quick         # tiny budgets, one window: a smoke run of the same code
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantkit.actquant import activation_scheme
from quantkit.api import CalibrationSpec, apply_transform, quantize
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.models.loading import LoadedModel, load_model
from quantkit.schemes import QuantScheme
from quantkit.textsources import load_eval_text
from quantkit.transforms import make_transform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"

SETTINGS: dict[str, tuple[QuantScheme, QuantScheme | None]] = {
    "W4A16": (QuantScheme(4, -1, True), None),
    "W4A4": (QuantScheme(4, -1, True), activation_scheme(4, "int")),
    "W4A4-NVFP4": (QuantScheme.for_format("nvfp4", 4, None, None, 16, True), activation_scheme(4, "nvfp4")),
}
TRANSFORMS = ("none", "hadamard", "flatquant", "ostquant")
METHODS = ("rtn", "gptq")


def _copy(loaded: LoadedModel) -> LoadedModel:
    """An independent copy of the model (the tokenizer and adapter are shared)."""
    return replace(loaded, model=copy.deepcopy(loaded.model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny calibration and training budgets, one eval window")
    parser.add_argument("--resume", action="store_true", help="keep the rows already saved, run the rest")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--transforms", default=",".join(TRANSFORMS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_transforms")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / ("quick.json" if args.quick else "bench_transforms.json")
    nsamples, seqlen, windows = (8, 128, 1) if args.quick else (64, 512, 3)
    budget = {"nsamples": 4, "seqlen": 128, "epochs": 1} if args.quick else {}
    calibration = CalibrationSpec(str(C4), nsamples, seqlen)
    console = Console(width=160)
    rows = json.loads(report.read_text())["results"] if args.resume and report.is_file() else {}

    text, _ = load_eval_text(str(WIKITEXT))
    base = load_model("smollm2-135m")
    tokens = tokenize_stream(text, base.tokenizer)

    def save() -> None:
        protocol = {"gptq_calibration": [nsamples, seqlen], "eval_windows": windows, "eval_seqlen": 2048,
                    "transform_budget_overrides": budget}
        report.write_text(json.dumps({"protocol": protocol, "results": rows}, indent=2) + "\n")

    if "fp32" not in rows:
        rows["fp32"] = {"perplexity": perplexity(base.model, tokens, 2048, windows, "wikitext2").perplexity}
        save()
    for setting in args.settings.split(","):
        scheme, act = SETTINGS[setting]
        for name in args.transforms.split(","):
            keys = {method: f"{setting}/{name}/{method}" for method in args.methods.split(",")}
            if all(k in rows for k in keys.values()):
                continue
            loaded, applied, transform_s = _copy(base), None, 0.0
            if name != "none":
                transform = make_transform(name, **(budget if name in ("flatquant", "ostquant") else {}))
                start = time.perf_counter()
                applied = apply_transform(loaded, transform, scheme, act, calibration)
                transform_s = time.perf_counter() - start
            for method, key in keys.items():
                if key in rows:
                    continue
                last = method == list(keys)[-1]
                result = quantize(loaded if last else _copy(loaded), method=method,
                                  scheme=scheme, calibration=calibration, act_scheme=act, transform=applied)
                ppl = perplexity(result.model, tokens, 2048, windows, "wikitext2").perplexity
                rows[key] = {"perplexity": ppl, "transform_s": transform_s, "quantize_s": result.seconds["quantize"],
                             "training": (applied.record.get("training") if applied else None)}
                console.print(f"{key}: ppl {ppl:.2f}, transform {transform_s:.0f} s, quantize {result.seconds['quantize']:.0f} s")
                save()
    table = Table(title=f"SmolLM2-135M, WikiText-2 perplexity ({windows} x 2048), fp32 {rows['fp32']['perplexity']:.2f}")
    table.add_column("setting")
    table.add_column("transform")
    for method in METHODS:
        table.add_column(method.upper(), justify="right")
    table.add_column("transform time", justify="right")
    for setting in SETTINGS:
        for name in TRANSFORMS:
            cells = [rows.get(f"{setting}/{name}/{m}") for m in METHODS]
            if not any(cells):
                continue
            seconds = next(c["transform_s"] for c in cells if c)
            table.add_row(setting, name, *(f"{c['perplexity']:.2f}" if c else "-" for c in cells), f"{seconds:.0f} s")
    console.print(table)
    console.print(f"report: {report}")


if __name__ == "__main__":
    main()
