#!/usr/bin/env python
"""Does vLLM's CPU build serve quantkit's compressed-tensors W8A8 checkpoints? SmolLM2-135M quantized by quantkit
(RTN, 8-bit weights per output channel) with int8 and FP8 activations, static per tensor and dynamic per token
(and int8 static after SmoothQuant), and FP8 weights per tensor (static per-tensor inputs: llm-compressor's FP8
preset) and in 128x128 (and 64x64) blocks (dynamic inputs per token and group of columns: FP8_BLOCK),
written with ``--layout compressed-tensors``; vLLM (in its own venv, see runtime_envs.py; float32, eager) and
quantkit.load score the same WikiText-2 windows. Each row: both perplexities and their ratio, or the one line
vLLM refused the checkpoint with. Static scales are calibrated on 128 x 512 tokens of the C4 validation parquet.

    python scripts/check_vllm_w8a8.py [--windows 4] [--out results/check_vllm_w8a8]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_vllm_moe import cpu  # noqa: E402
from runtime_envs import RunnerError, ensure, run_runner  # noqa: E402

from quantkit.actquant import StaticActivations, activation_scheme  # noqa: E402
from quantkit.api import CalibrationSpec, quantize  # noqa: E402
from quantkit.eval.perplexity import tokenize_stream  # noqa: E402
from quantkit.models.loading import load_model  # noqa: E402
from quantkit.schemes import QuantScheme  # noqa: E402
from quantkit.textsources import load_eval_text  # noqa: E402
from quantkit.transforms import make_transform  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
console = Console(width=160)
STATIC = StaticActivations("tensor", "minmax")
CHECKPOINTS = {  # name -> (weights, activations, static, transform)
    "int8-static": (QuantScheme(8, -1, True), activation_scheme(8, "int"), STATIC, None),
    "int8-dynamic": (QuantScheme(8, -1, True), activation_scheme(8, "int"), None, None),
    "fp8-dynamic": (QuantScheme(8, -1, True, "fp8"), activation_scheme(8, "fp8"), None, None),
    "fp8-static": (QuantScheme(8, -1, True, "fp8"), activation_scheme(8, "fp8"), STATIC, None),
    "smoothquant-int8-static": (QuantScheme(8, -1, True), activation_scheme(8, "int"), STATIC, "smoothquant"),
    "fp8-tensor-static": (QuantScheme(8, -1, True, "fp8", -1), activation_scheme(8, "fp8"), STATIC, None),
    "fp8-block-dynamic": (QuantScheme(8, 128, True, "fp8", 128), activation_scheme(8, "fp8", 128), None, None),
    # 576 hidden is no multiple of 128: 64x64 blocks tile every SmolLM2 layer
    "fp8-block64-dynamic": (QuantScheme(8, 64, True, "fp8", 64), activation_scheme(8, "fp8", 64), None, None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="WikiText-2 windows of 2048 tokens")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "check_vllm_w8a8")
    parser.add_argument("--only", default=",".join(CHECKPOINTS), help="the checkpoints to (re)score; saved rows of "
                        "the others are kept")
    args = parser.parse_args()
    console.print(f"CPU: {cpu()}")
    args.out.mkdir(parents=True, exist_ok=True)
    base = load_model("smollm2-135m")
    text, _ = load_eval_text(str(WIKITEXT))
    stream = tokenize_stream(text, base.tokenizer)
    windows = [stream[i * 2048:(i + 1) * 2048].tolist() for i in range(args.windows)]
    request = {"windows": windows, "prompt": windows[0][:16], "new_tokens": 4, "threads": 2,
               "options": {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 2}}
    vllm = ensure("vllm", log=console.print)
    saved = args.out / "results.json"
    results = {"cpu": cpu(), "windows": args.windows,
               "checkpoints": json.loads(saved.read_text())["checkpoints"] if saved.is_file() else {}}
    table = Table(title="quantkit compressed-tensors W8A8 checkpoints in vLLM CPU (float32)")
    for column in ("checkpoint", "quantkit.load ppl", "vLLM ppl", "vLLM / quantkit", "vLLM"):
        table.add_column(column)
    for name in args.only.split(","):
        weights, acts, static, transform = CHECKPOINTS[name]
        folder = args.out / name
        if not (folder / "config.json").is_file():
            quantize("smollm2-135m", method="rtn", scheme=weights, act_scheme=acts, act_static=static,
                     layout="compressed-tensors", output=folder, overwrite=True,
                     transform=None if transform is None else make_transform(transform),
                     calibration=CalibrationSpec(str(C4), 128, 512))
        mine = run_runner({**request, "runtime": "quantkit", "model": str(folder)})
        row = {"quantkit_ppl": math.exp(sum(mine["window_nlls"]) / len(windows))}
        try:
            served = run_runner({**request, "runtime": "vllm", "model": str(folder)}, vllm, log=folder / "vllm.log",
                                env={"VLLM_CPU_KVCACHE_SPACE": "2"})
            row |= {"vllm_ppl": math.exp(sum(served["window_nlls"]) / len(windows)), "vllm": "served",
                    "settings": served.get("settings")}
            row["ratio"] = row["vllm_ppl"] / row["quantkit_ppl"]
        except RunnerError as error:
            row |= {"vllm_ppl": None, "ratio": None, "vllm": f"refused: {str(error).lstrip(': ')}"}
        results["checkpoints"][name] = row
        saved.write_text(json.dumps(results, indent=1))
    for name, row in results["checkpoints"].items():
        table.add_row(name, f"{row['quantkit_ppl']:.3f}", "-" if row["vllm_ppl"] is None else f"{row['vllm_ppl']:.3f}",
                      "-" if row["ratio"] is None else f"{row['ratio']:.4f}", row["vllm"][:80])
    console.print(table)
    console.print(f"saved {saved}")


if __name__ == "__main__":
    main()
