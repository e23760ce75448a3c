#!/usr/bin/env python
"""Generation benchmark: greedy decode tokens/s of SmolLM2-135M in fp32 and bf16, quantkit's serving paths on
W4/W8/SpQR checkpoints (and quantized heads), torch's int4 op, vLLM's CPU engine and llama.cpp on the same W4
weights, all in one run on this machine.

Checkpoints (made once under results/bench_generate/, reused): RTN W4 g64 symmetric (with a float head, an int8
head and an int4 head: ``--quantize-head``), RTN W8 per-channel symmetric, SpQR W3 g16 (C4 calibration 128 x
512), and RTN NVFP4 for bench_serving_accuracy.py. vLLM serves the W4 checkpoints' GPTQ exports (its CPU default for int4: int8 activations), llama.cpp their
GGUF exports (q4_0 blocks; the int8 head as q8_0). Every row runs scripts/runtime_runner.py in its own process
(the runtime's own venv for vLLM and llama.cpp, see runtime_envs.py; a row that cannot run is one line in the
table): the prompt is the first 128 tokens of WikiText-2 test, greedy decode of --new-tokens tokens after a
warm-up, perplexity on one 512-token window as an accuracy check. quantkit rows also report where decode time
goes: per token inside the linears and outside them (norms, attention, cache, Python), from a second generate
with every linear timed. Rows marked "lean decoder" generate with quantkit.runtime.decode.LeanDecoder (static
cache, fused q/k/v and gate/up) instead of transformers' generate. The exact W4 row's greedy tokens are
checked against the fake-quantized model's, and the exact lean row's against the exact transformers row's (int8
decode can flip a near tie: its activations' rounding follows the last bits of the norm before it).

    python scripts/bench_generate.py            # the full run (vLLM and llama.cpp environments built once)
    python scripts/bench_generate.py --quick    # 16 new tokens, quantkit rows only
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import quantkit_cli  # noqa: E402
from runtime_envs import RunnerError, RuntimeUnavailable, ensure, run_runner  # noqa: E402

from quantkit_kernels.cpu_isa import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
C4 = ROOT.parent / "shared" / "data" / "c4" / "c4_validation_2k.parquet"
MODEL = "smollm2-135m"
W4 = ["--method", "rtn", "--bits", "4", "--group-size", "64", "--sym"]
CHECKPOINTS = {
    "w4": W4,
    "w4-head8": [*W4, "--quantize-head", "int8"],
    "w4-head4": [*W4, "--quantize-head", "int4"],
    "w8": ["--method", "rtn", "--bits", "8", "--group-size", "-1", "--sym"],
    "spqr-w3": ["--method", "spqr", "--bits", "3", "--group-size", "16"],
    "nvfp4": ["--method", "rtn", "--format", "nvfp4"],  # for bench_serving_accuracy.py
}
EXPORTS = {"w4-gptq": ("w4", "gptq"), "w4-head4-gptq": ("w4-head4", "gptq"), "w4.gguf": ("w4", "gguf"),
           "w4-head8.gguf": ("w4-head8", "gguf")}
PROMPT_TOKENS, WINDOW_TOKENS = 128, 512
console = Console(width=170)


@dataclass(frozen=True)
class Row:
    """One model in one runtime: runtime_runner's runtime name, the venv (None: the project's), the model (a
    checkpoint or export key, or the built-in model's name) and the runner's options."""

    label: str
    runtime: str
    venv: str | None
    model: str
    options: dict = field(default_factory=dict)


TIMED = {"time_linears": True}
INT8 = {"backend": "cpu-int8", **TIMED}
LEAN = {"decoder": "lean", **TIMED}
ROWS = [
    Row("fp32", "quantkit-eval", None, MODEL, TIMED),
    Row("fp32, lean decoder", "quantkit-eval", None, MODEL, LEAN),
    Row("bf16", "quantkit-eval", None, MODEL, {"dtype": "bfloat16", **TIMED}),
    Row("W4 fake-quant (float weights)", "quantkit-fake", None, "w4"),
    Row("W4 g64, quantkit cpu (exact, the default)", "quantkit", None, "w4", TIMED),
    Row("W4 g64, quantkit cpu-int8", "quantkit", None, "w4", INT8),
    Row("W4 g64, torch int4 op (aten, bf16 model)", "quantkit", None, "w4", {"backend": "aten", "dtype": "bfloat16"}),
    Row("W4 g64 + int8 head, quantkit cpu", "quantkit", None, "w4-head8", TIMED),
    Row("W4 g64 + int8 head, quantkit cpu-int8", "quantkit", None, "w4-head8", INT8),
    Row("W4 g64 + int4 head, quantkit cpu-int8", "quantkit", None, "w4-head4", INT8),
    Row("W4 g64, quantkit cpu-int8, lean decoder", "quantkit", None, "w4", {**INT8, **LEAN}),
    Row("W4 g64 + int8 head, quantkit cpu, lean decoder", "quantkit", None, "w4-head8", LEAN),
    Row("W4 g64 + int8 head, quantkit cpu-int8, lean decoder", "quantkit", None, "w4-head8", {**INT8, **LEAN}),
    Row("W8 per-channel, quantkit cpu-int8", "quantkit", None, "w8", INT8),
    Row("SpQR W3 g16, quantkit cpu", "quantkit", None, "spqr-w3", TIMED),
    Row("SpQR W3 g16, quantkit cpu-int8", "quantkit", None, "spqr-w3", INT8),
    Row("SpQR W3 g16, quantkit cpu-int8, lean decoder", "quantkit", None, "spqr-w3", {**INT8, **LEAN}),
    Row("vLLM CPU, W4 GPTQ export", "vllm", "vllm", "w4-gptq"),
    Row("vLLM CPU, W4 + int4 head GPTQ export", "vllm", "vllm", "w4-head4-gptq"),
    Row("llama.cpp, W4 GGUF export (q4_0, f32 head)", "llama.cpp", "llama.cpp", "w4.gguf"),
    Row("llama.cpp, W4 + int8 head GGUF export (q4_0, q8_0 head)", "llama.cpp", "llama.cpp", "w4-head8.gguf"),
]
QUICK = {"fp32", "W4 fake-quant (float weights)", "W4 g64, quantkit cpu (exact, the default)", "W4 g64, quantkit cpu-int8",
         "W4 g64 + int8 head, quantkit cpu-int8", "W4 g64 + int8 head, quantkit cpu-int8, lean decoder"}


def ensure_checkpoint(name: str, folder: Path) -> Path:
    """The checkpoint ``name`` of :data:`CHECKPOINTS` under ``folder`` (quantized once)."""
    target = folder / name
    if not (target / "config.json").is_file():
        console.log(f"quantizing {name}: {' '.join(CHECKPOINTS[name])}")
        quantkit_cli("quantize", MODEL, *CHECKPOINTS[name], "--calib", str(C4), "--nsamples", "128", "--seqlen", "512",
                     "--seed", "0", "-o", str(target), "--overwrite", log=folder / f"{name}.log")
    return target


def ensure_export(name: str, folder: Path) -> Path:
    source, layout = EXPORTS[name]
    target = folder / name
    if not target.exists():
        quantkit_cli("export", str(ensure_checkpoint(source, folder)), "-o", str(target), "--layout", layout,
                     log=folder / f"{name}.log")
    return target


def model_path(row: Row, folder: Path) -> str:
    if row.model in CHECKPOINTS:
        return str(ensure_checkpoint(row.model, folder))
    if row.model in EXPORTS:
        return str(ensure_export(row.model, folder))
    return row.model


def tokens() -> tuple[list[int], list[int]]:
    """The prompt and the perplexity window: WikiText-2 test through SmolLM2's tokenizer."""
    from quantkit.eval.perplexity import tokenize_stream
    from quantkit.models.loading import load_model

    ids = tokenize_stream(WIKITEXT.read_text()[:20000], load_model(MODEL).tokenizer).tolist()
    return ids[:PROMPT_TOKENS], ids[:WINDOW_TOKENS]


def run_row(row: Row, folder: Path, prompt: list[int], window: list[int], new_tokens: int, threads: int) -> dict:
    runtime = ensure(row.venv, log=console.log) if row.venv else None
    request = {"runtime": row.runtime, "model": model_path(row, folder), "windows": [window], "prompt": prompt,
               "new_tokens": new_tokens, "threads": threads, "options": row.options}
    slug = "".join(c if c.isalnum() else "-" for c in row.label.lower())
    return run_runner(request, runtime, timeout=3600, log=folder / f"runner-{slug}.log")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", help="row labels to run, separated by semicolons (default: all)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_generate")
    args = parser.parse_args()
    import torch

    cpu, threads = describe(), torch.get_num_threads()
    console.log(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}; C kernel build "
                f"{cpu['isa']}, prefill {cpu['prefill']}; {threads} threads")
    new_tokens = 16 if args.quick else args.new_tokens
    rows = [r for r in ROWS if (not args.quick or r.label in QUICK) and (not args.rows or r.label in args.rows.split(";"))]
    args.out.mkdir(parents=True, exist_ok=True)
    prompt, window = tokens()
    results: dict[str, dict] = {}
    for row in rows:
        try:
            results[row.label] = run_row(row, args.out, prompt, window, new_tokens, threads)
            console.log(f"{row.label}: {results[row.label]['decode_tokens_per_s']:.1f} tok/s")
        except (RunnerError, RuntimeUnavailable, RuntimeError) as exc:
            results[row.label] = {"error": str(exc).splitlines()[0][:300]}
            console.log(f"{row.label}: failed: {results[row.label]['error']}")
    render(results, new_tokens, cpu)
    token_checks = {"exact_w4_tokens_match_fake_quant": (
                        "exact W4 greedy tokens identical to the fake-quantized model's",
                        "W4 g64, quantkit cpu (exact, the default)", "W4 fake-quant (float weights)"),
                    "lean_exact_tokens_match_transformers": (
                        "lean decoder's exact greedy tokens identical to transformers' generate on the same model",
                        "W4 g64 + int8 head, quantkit cpu, lean decoder", "W4 g64 + int8 head, quantkit cpu")}
    checks: dict[str, bool | None] = {}
    for key, (claim, label, reference) in token_checks.items():
        generated, expected = (results.get(name, {}).get("generated") for name in (label, reference))
        checks[key] = None if generated is None or expected is None else generated == expected  # None: not both ran
        if checks[key] is not None:
            console.print(f"{claim}: {checks[key]}")
    path = args.out / "bench_generate.json"
    path.write_text(json.dumps({"cpu": cpu, "threads": threads, "new_tokens": new_tokens, "prompt_tokens": PROMPT_TOKENS,
                                **checks, "results": results}, indent=2) + "\n")
    console.log(f"saved {path}")


def render(results: dict[str, dict], new_tokens: int, cpu: dict) -> None:
    table = Table(title=f"SmolLM2-135M greedy decode, prompt {PROMPT_TOKENS}, {new_tokens} new tokens; {cpu['model']} "
                        f"({' '.join(cpu['flags'])}), build {cpu['isa']}")
    for column in ("row", "decode tok/s", "vs fp32", "prefill s", "ppl (512)", "ms/token in linears", "outside"):
        table.add_column(column, justify="left" if column == "row" else "right")
    base = (results.get("fp32") or {}).get("decode_tokens_per_s")
    for label, r in results.items():
        if "error" in r:
            table.add_row(label, "failed", "", "", "", "", r["error"][:60])
            continue
        speed, split = r["decode_tokens_per_s"], r.get("time_split") or {}
        table.add_row(label, f"{speed:.1f}", f"{speed / base:.2f}x" if base else "", f"{r['prefill_s']:.3f}",
                      f"{r['perplexity']:.2f}", f"{split['linear_ms_per_token']:.1f}" if split else "",
                      f"{split['outside_linears_ms_per_token']:.1f}" if split else "")
    console.print(table)


if __name__ == "__main__":
    main()
