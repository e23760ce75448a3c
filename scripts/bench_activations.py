#!/usr/bin/env python
"""Activation-aware and static-activation methods on SmolLM2-135M: WikiText-2 perplexity of AWQ against RTN and
GPTQ at W4 g64 (and of AWQ searched after the Hadamard rotation, ``hadamard+awq``, against the rotation alone), W8A8 int8 static against dynamic (with and without SmoothQuant), FP8 W8A8 static and dynamic,
static W4A4 (per-channel static int4 scales, and MergeQuant-style merged ones, alone and after the Hadamard rotation) against dynamic per-token W4A4
(with and without FlatQuant or the Hadamard rotation), and an int8/FP8 KV cache (static per-layer scales) against a float one under
8-bit weights.

Protocol (the README's): calibration on 128 windows x 512 tokens of the C4 validation parquet (seed 0) for
GPTQ, the static scales and the transforms (AWQ: 64 x 512, its cpu budget; SmoothQuant: 128 x 512);
perplexity on the first 16 windows x 2048 tokens of WikiText-2 test. Weights are symmetric; W8 and FP8 weights
and the W4A4 rows are per output channel (FP8 also per tensor, and in 128 x 128 blocks) (W4A4 with RTN, as the transforms benchmark's rows). A transform is applied once per setting and shared by RTN and GPTQ.
Everything runs in this process; the report is saved after every row (``--resume`` keeps the rows saved).

    python scripts/bench_activations.py                 # the full table (about an hour on 2 cores)
    python scripts/bench_activations.py --quick         # tiny budgets, one window: a smoke run of the same code
    python scripts/bench_activations.py --rows awq-rtn,awq-gptq
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from quantkit.actquant import StaticActivations, activation_scheme
from quantkit.api import CalibrationSpec, apply_transform, quantize
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.kvcache import KVCacheQuantization
from quantkit.models.loading import LoadedModel, load_model
from quantkit.schemes import QuantScheme
from quantkit.textsources import load_eval_text
from quantkit.transforms import BUDGETS, SEPARATOR, make_transform

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
W4G64 = QuantScheme(4, 64, True)
W4 = QuantScheme(4, -1, True)
W8 = QuantScheme(8, -1, True)
FP8 = QuantScheme(8, -1, True, "fp8")
FP8_PER_TENSOR = QuantScheme(8, -1, True, "fp8", block_rows=-1)  # llm-compressor's FP8 preset, with static inputs
FP8_BLOCK = QuantScheme(8, 128, True, "fp8", block_rows=128)  # FP8_BLOCK: 128x128 weight blocks
FP8_GROUP_ACT = activation_scheme(8, "fp8", 128)  # ... and dynamic inputs per token and 128 columns
INT8, FP8_ACT, INT4 = activation_scheme(8, "int"), activation_scheme(8, "fp8"), activation_scheme(4, "int")
TENSOR = StaticActivations("tensor", "minmax")


@dataclass(frozen=True)
class Row:
    setting: str
    label: str
    method: str
    scheme: QuantScheme
    transform: str | None = None
    act: QuantScheme | None = None
    static: StaticActivations | None = None
    kv: KVCacheQuantization | None = None


ROWS = {row.label: row for row in (
    Row("W4A16 g64", "rtn", "rtn", W4G64),
    Row("W4A16 g64", "gptq", "gptq", W4G64),
    Row("W4A16 g64", "awq-rtn", "rtn", W4G64, "awq"),
    Row("W4A16 g64", "awq-gptq", "gptq", W4G64, "awq"),
    Row("W4A16 g64", "hadamard-rtn", "rtn", W4G64, "hadamard"),
    Row("W4A16 g64", "hadamard-gptq", "gptq", W4G64, "hadamard"),
    Row("W4A16 g64", "hadamard-awq-rtn", "rtn", W4G64, "hadamard+awq"),
    Row("W4A16 g64", "hadamard-awq-gptq", "gptq", W4G64, "hadamard+awq"),
    Row("W8A8 int8", "int8-dynamic", "rtn", W8, None, INT8),
    Row("W8A8 int8", "int8-static", "rtn", W8, None, INT8, TENSOR),
    Row("W8A8 int8", "smoothquant-int8-static", "rtn", W8, "smoothquant", INT8, TENSOR),
    Row("W8A8 fp8", "fp8-dynamic", "rtn", FP8, None, FP8_ACT),
    Row("W8A8 fp8", "fp8-static", "rtn", FP8, None, FP8_ACT, TENSOR),
    Row("W8A8 fp8", "fp8-tensor-static", "rtn", FP8_PER_TENSOR, None, FP8_ACT, TENSOR),
    Row("W8A8 fp8", "fp8-block-dynamic", "rtn", FP8_BLOCK, None, FP8_GROUP_ACT),
    Row("KV cache", "w8-float-kv", "rtn", W8),
    Row("KV cache", "w8-kv-int8", "rtn", W8, kv=KVCacheQuantization("int", "tensor")),
    Row("KV cache", "w8-kv-fp8", "rtn", W8, kv=KVCacheQuantization("fp8", "tensor")),
    Row("W4A4 int4", "w4a4-dynamic-rtn", "rtn", W4, None, INT4),
    Row("W4A4 int4", "w4a4-static-channel-rtn", "rtn", W4, None, INT4, StaticActivations("channel", "mse")),
    Row("W4A4 int4", "w4a4-static-tensor-rtn", "rtn", W4, None, INT4, StaticActivations("tensor", "mse")),
    Row("W4A4 int4", "w4a4-dynamic-flatquant-rtn", "rtn", W4, "flatquant", INT4),
    Row("W4A4 int4", "w4a4-dynamic-hadamard-rtn", "rtn", W4, "hadamard", INT4),
    Row("W4A4 int4", "w4a4-dynamic-hadamard-gptq", "gptq", W4, "hadamard", INT4),
    Row("W4A4 int4", "w4a4-static-mergequant-rtn", "rtn", W4, "mergequant", INT4, StaticActivations("tensor", "mse")),
    Row("W4A4 int4", "w4a4-static-mergequant-gptq", "gptq", W4, "mergequant", INT4, StaticActivations("tensor", "mse")),
    Row("W4A4 int4", "w4a4-static-hadamard-mergequant-rtn", "rtn", W4, "hadamard+mergequant", INT4,
        StaticActivations("tensor", "mse")),
    Row("W4A4 int4", "w4a4-static-hadamard-mergequant-gptq", "gptq", W4, "hadamard+mergequant", INT4,
        StaticActivations("tensor", "mse")),
)}


def cpu() -> str:
    info = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return f"{model} ({' '.join(f for f in wanted if f in flags)}), {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny calibration budgets, one eval window")
    parser.add_argument("--resume", action="store_true", help="keep the rows already saved, run the rest")
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_activations")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / ("quick.json" if args.quick else "bench_activations.json")
    nsamples, seqlen, windows = (8, 128, 1) if args.quick else (128, 512, 16)
    budget = {"nsamples": 4, "seqlen": 128} if args.quick else {}
    calibration = CalibrationSpec(str(C4), nsamples, seqlen)
    console = Console(width=160)
    console.print(f"CPU: {cpu()}")
    results = json.loads(report.read_text())["results"] if args.resume and report.is_file() else {}
    text, _ = load_eval_text(str(WIKITEXT))
    base = load_model("smollm2-135m")
    tokens = tokenize_stream(text, base.tokenizer)
    transformed: dict[tuple[str, QuantScheme], tuple[LoadedModel, object, float]] = {}

    def save() -> None:
        protocol = {"calibration": [nsamples, seqlen], "eval_windows": windows, "eval_seqlen": 2048,
                    "transform_budget_overrides": budget, "cpu": cpu()}
        report.write_text(json.dumps({"protocol": protocol, "results": results}, indent=1))

    for label in args.rows.split(","):
        row = ROWS[label]
        if label in results:
            continue
        started = time.perf_counter()
        transform_s = 0.0
        if row.transform is None:
            loaded, applied = replace(base, model=copy.deepcopy(base.model)), None
        else:
            key = (row.transform, row.scheme)
            if key not in transformed:
                work = replace(base, model=copy.deepcopy(base.model))
                t0 = time.perf_counter()
                calibrated = any(step in BUDGETS for step in row.transform.split(SEPARATOR))
                transform = make_transform(row.transform, **(budget if calibrated else {}))
                done = apply_transform(work, transform, row.scheme, row.act, calibration)
                transformed[key] = (work, done, time.perf_counter() - t0)
            source, applied, transform_s = transformed[key]
            loaded = replace(source, model=copy.deepcopy(source.model))
        result = quantize(loaded, method=row.method, scheme=row.scheme, calibration=calibration, act_scheme=row.act,
                          act_static=row.static, kv_cache=row.kv, transform=applied)
        ppl = perplexity(result.model, tokens, seqlen=2048, max_windows=windows).perplexity
        results[label] = {"setting": row.setting, "method": row.method, "transform": row.transform,
                          "activations": None if row.act is None else row.act.to_dict(),
                          "static": None if row.static is None else row.static.to_dict(),
                          "kv_cache": None if row.kv is None else row.kv.record(), "perplexity": ppl,
                          "transform_s": transform_s, "total_s": time.perf_counter() - started}
        console.print(f"{label}: perplexity {ppl:.2f} ({results[label]['total_s']:.0f} s)")
        save()
    table = Table(title=f"SmolLM2-135M, WikiText-2 {windows} x 2048 ({cpu()})")
    for column in ("setting", "row", "perplexity", "transform s", "total s"):
        table.add_column(column)
    for label, r in results.items():
        table.add_row(r["setting"], label, f"{r['perplexity']:.2f}", f"{r['transform_s']:.0f}", f"{r['total_s']:.0f}")
    console.print(table)
    console.print(f"saved {report}")


if __name__ == "__main__":
    main()
