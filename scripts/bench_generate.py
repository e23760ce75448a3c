#!/usr/bin/env python
"""Generation benchmark: greedy tokens/s and resident memory of SmolLM2-135M fp32 vs loaded W4 and W8.

Checkpoints: RTN W4 g64 symmetric and W8 per-channel symmetric (made once under results/, reused; pass
``--method gptq`` for GPTQ checkpoints). Every model runs in its own process: the prompt is the first 128
tokens of WikiText-2 test, generation is greedy with exactly 128 new tokens. Prefill time is a 1-token
generate; decode tokens/s = 127 / (full generate - prefill). Memory: resident set after loading minus the
process's resident set before (torch and transformers imported), and the peak. The loaded W4 model's tokens
are checked against the fake-quantized float model (dequantized weights in an ordinary model).

    python scripts/bench_generate.py           # the full run
    python scripts/bench_generate.py --quick   # 16 new tokens
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4_validation_2k.parquet"
CHECKPOINTS = {"w4": ["--bits", "4", "--group-size", "64", "--sym"], "w8": ["--bits", "8", "--group-size", "-1", "--sym"]}
PROMPT_TOKENS = 128


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def fake_quantized(checkpoint: str):
    """The float model with every quantized linear's weight replaced by its dequantized value."""
    import torch

    import quantkit
    from quantkit.models.loading import load_model
    from quantkit.runtime.quant_linear import QuantLinear

    model = load_model("smollm2-135m").model
    for name, layer in quantkit.load(checkpoint).named_modules():
        if isinstance(layer, QuantLinear):
            model.get_submodule(name).weight.data = layer.quantized().dequantize(torch.float32)
    return model


def worker(kind: str, checkpoint: str | None, new_tokens: int, backend: str) -> dict:
    """Load one model, generate, and report timings, memory and the tokens (runs in its own process)."""
    import torch
    import transformers  # noqa: F401 - imported before the baseline so that it counts as overhead

    import quantkit
    from quantkit.models.loading import load_model
    from quantkit.runtime.quant_linear import set_backend

    before = rss_mib()
    start = time.perf_counter()
    if kind == "fp32":
        loaded = load_model("smollm2-135m")
        model, tokenizer = loaded.model, loaded.tokenizer
    elif kind == "fake-quant":
        model, tokenizer = fake_quantized(checkpoint), quantkit.load_tokenizer(checkpoint)
    else:
        model, tokenizer = quantkit.load(checkpoint), quantkit.load_tokenizer(checkpoint)
        set_backend(model, backend)
    load_seconds = time.perf_counter() - start
    ids = tokenizer(WIKITEXT.read_text()[:4000], return_tensors="pt").input_ids[:, :PROMPT_TOKENS]

    def generate(count: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                                 attention_mask=torch.ones_like(ids), pad_token_id=tokenizer.eos_token_id)
        return time.perf_counter() - t0, out[0, ids.shape[1]:].tolist()

    generate(4)  # warm-up: kernels are built on the first call
    loaded_rss = rss_mib()
    prefill, _ = generate(1)
    total, tokens = generate(new_tokens)
    return {"model": kind, "load_s": load_seconds, "prefill_s": prefill, "generate_s": total,
            "decode_tokens_per_s": (new_tokens - 1) / (total - prefill), "tokens_per_s": new_tokens / total,
            "rss_model_mib": loaded_rss - before, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens": tokens}


def ensure_checkpoint(name: str, method: str, folder: Path) -> Path:
    target = folder / f"{method}-{name}"
    if not (target / "config.json").is_file():
        command = [sys.executable, "-m", "quantkit", "quantize", "smollm2-135m", "--method", method, *CHECKPOINTS[name],
                   "--calib", str(C4), "--nsamples", "128", "--seqlen", "512", "--seed", "0", "-o", str(target),
                   "--overwrite"]
        subprocess.run(command, check=True)
    return target


def run_worker(kind: str, checkpoint: Path | None, new_tokens: int, backend: str) -> dict:
    command = [sys.executable, __file__, "--worker", kind, "--new-tokens", str(new_tokens), "--backend", backend]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--method", default="rtn", choices=["rtn", "gptq"])
    parser.add_argument("--backend", default="auto", help="kernel backend of the loaded checkpoints")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_generate")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.checkpoint, args.new_tokens, args.backend)))
        return
    new_tokens = 16 if args.quick else 128
    console = Console(width=150)
    checkpoints = {name: ensure_checkpoint(name, args.method, args.out) for name in CHECKPOINTS}
    runs = [("fp32", None), ("fake-quant", checkpoints["w4"]), ("w4", checkpoints["w4"]), ("w8", checkpoints["w8"])]
    results = {}
    for kind, checkpoint in runs:
        results[kind] = run_worker(kind, checkpoint, new_tokens, args.backend)
        console.log(f"{kind}: {results[kind]['decode_tokens_per_s']:.1f} tok/s")
    same = results["w4"]["tokens"] == results["fake-quant"]["tokens"]
    table = Table(title=f"SmolLM2-135M greedy generation, prompt {PROMPT_TOKENS}, {new_tokens} new tokens "
                        f"({args.method}, backend {args.backend})")
    for column in ("model", "decode tok/s", "overall tok/s", "prefill s", "model RSS MiB", "peak RSS MiB", "vs fp32"):
        table.add_column(column, justify="left" if column == "model" else "right")
    base = results["fp32"]["decode_tokens_per_s"]
    for kind, r in results.items():
        table.add_row(kind, f"{r['decode_tokens_per_s']:.1f}", f"{r['tokens_per_s']:.1f}", f"{r['prefill_s']:.3f}",
                      f"{r['rss_model_mib']:.0f}", f"{r['peak_rss_mib']:.0f}", f"{r['decode_tokens_per_s'] / base:.2f}x")
    console.print(table)
    console.print(f"W4 greedy tokens identical to the fake-quantized model: {same}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "bench_generate.json"
    path.write_text(json.dumps({"new_tokens": new_tokens, "method": args.method, "backend": args.backend,
                                "w4_tokens_match_fake_quant": same, "results": results}, indent=2) + "\n")
    console.log(f"saved {path}")
    if not same:
        raise SystemExit("W4 greedy tokens differ from the fake-quantized model")


if __name__ == "__main__":
    main()
