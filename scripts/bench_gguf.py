#!/usr/bin/env python
"""GGUF benchmark: quantkit's Q4_K (RTN and GPTQ on llama.cpp's own grid) against llama.cpp's `llama-quantize`
Q4_K, without and with an importance matrix, at equal size, all scored by llama.cpp itself.

Steps (each cached under --out; llama.cpp built by runtime_envs.py under ~/.cache/quantkit/runtimes):
1. `quantkit export smollm2-135m --layout gguf --gguf-type f16`: the float source llama.cpp's tools start from.
2. quantkit: `quantize --method rtn|gptq --gguf-type q4_k` (GPTQ calibrated on 128 x 512 tokens of the C4
   validation parquet, seed 0; act-order with static groups, the default at 4 bits, and with the group-aware
   order, `--no-static-groups`). Rows whose length is no multiple of 256 (SmolLM2's 576-wide projections) take
   q5_0, as llama-quantize does; unquantized matrices are float16.
3. llama.cpp: `llama-imatrix` on the f16 file over C4 validation text (128 chunks of 512 tokens, the same budget),
   then `llama-quantize --pure --token-embedding-type f16 F16.gguf OUT.gguf Q4_K`, without and with `--imatrix`:
   the same tensor types as quantkit's files (checked), hence the same size.
4. Perplexity of every file on the first --windows windows of --seqlen WikiText-2 test tokens (tokenized once
   with the model's Hugging Face tokenizer, no BOS) by llama.cpp (llama-cpp-python, full logits), and by
   `quantkit eval FILE.gguf` (dequantized through transformers) as the reference each must match within 1%.

    python scripts/bench_gguf.py            # the full run
    python scripts/bench_gguf.py --quick    # synthetic calibration 16 x 64, 8 imatrix chunks, 2 windows x 512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import C4, MODEL, TOLERANCE, quantkit_cli, token_ids  # noqa: E402
from llama_tools import imatrix, quantize  # noqa: E402
from runtime_envs import RunnerError, ensure, run_runner  # noqa: E402

from quantkit_kernels.cpu_isa import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=160)


def tensor_types(path: Path) -> Counter:
    """How many tensors of each GGML type a GGUF file holds."""
    from gguf import GGUFReader

    return Counter(t.tensor_type.name for t in GGUFReader(path).tensors)


def made(path: Path, make) -> Path:
    """``path``, made by ``make()`` unless it exists."""
    if not path.exists():
        console.log(f"making {path.name}")
        make()
    return path


def quantkit_q4_k(method: str, output: Path, args: argparse.Namespace, *flags: str) -> Path:
    calib = str(C4) if args.calib == "c4" else args.calib
    return made(output, lambda: quantkit_cli(
        "quantize", MODEL, "--method", method, "--gguf-type", "q4_k", *flags, "--calib", calib, "--nsamples",
        str(args.nsamples), "--seqlen", str(args.calib_seqlen), "--seed", "0", "-o", str(output),
        log=output.with_suffix(".log")))


def perplexity(runner: str, path: Path, request: dict, runtime, logs: Path) -> dict:
    try:
        return run_runner({**request, "runtime": runner, "model": str(path), "options": {}}, runtime, 3600,
                          logs / f"{runner}-{path.stem}.log")
    except RunnerError as error:
        return {"error": str(error)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--windows", type=int, default=None, help="WikiText-2 windows (16; quick 2)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (2048; quick 512)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_gguf")
    args = parser.parse_args()
    quick = args.quick
    args.calib, args.nsamples, args.calib_seqlen = ("synthetic", 16, 64) if quick else ("c4", 128, 512)
    args.windows = args.windows or (2 if quick else 16)
    args.seqlen = args.seqlen or (512 if quick else 2048)
    chunks = 8 if quick else 128
    cpu = describe()
    console.print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}")
    folder = args.out / ("quick" if quick else "full")
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    llama = ensure("llama.cpp", build=True, log=console.log)

    f16 = made(folder / "smollm2-f16.gguf", lambda: quantkit_cli(
        "export", MODEL, "-o", str(folder / "smollm2-f16.gguf"), "--layout", "gguf", "--gguf-type", "f16",
        log=logs / "export-f16.log"))
    matrix = made(folder / "imatrix.gguf", lambda: imatrix(f16, folder / "imatrix.gguf", "c4", chunks, 512))
    files = {
        "quantkit RTN q4_k": quantkit_q4_k("rtn", folder / "quantkit-rtn-q4_k.gguf", args),
        "quantkit GPTQ q4_k (static groups, the default)": quantkit_q4_k(
            "gptq", folder / "quantkit-gptq-q4_k-static.gguf", args),
        "quantkit GPTQ q4_k --no-static-groups": quantkit_q4_k(
            "gptq", folder / "quantkit-gptq-q4_k.gguf", args, "--no-static-groups"),
        "llama-quantize Q4_K": made(folder / "llama-q4_k.gguf", lambda: quantize(
            f16, folder / "llama-q4_k.gguf", "Q4_K", token_embedding_type="f16")),
        "llama-quantize Q4_K + imatrix": made(folder / "llama-q4_k-imatrix.gguf", lambda: quantize(
            f16, folder / "llama-q4_k-imatrix.gguf", "Q4_K", matrix, token_embedding_type="f16")),
    }
    windows, prompt, _ = token_ids(args.seqlen, args.windows, 16)
    request = {"windows": windows, "prompt": prompt, "new_tokens": 4, "threads": os.cpu_count() or 1}
    rows = []
    for label, path in files.items():
        console.log(f"scoring {label}")
        ours = perplexity("quantkit-eval", path, request, None, logs)
        theirs = perplexity("llama.cpp", path, request, llama, logs)
        rows.append({"label": label, "file": str(path), "bytes": path.stat().st_size,
                     "tensor_types": dict(tensor_types(path)), "llama_cpp": theirs, "quantkit_eval": ours})
    base_types = rows[0]["tensor_types"]
    table = Table(title=f"SmolLM2-135M Q4_K: WikiText-2 perplexity on {len(windows)} x {args.seqlen} tokens "
                        f"(llama.cpp scores; quantkit eval as the dequantized reference)")
    for column in ("file", "MiB", "tensor types", "llama.cpp ppl", "quantkit eval ppl", "agree"):
        table.add_column(column, justify="left" if column in ("file", "tensor types") else "right")
    for row in rows:
        theirs, ours = row["llama_cpp"].get("perplexity"), row["quantkit_eval"].get("perplexity")
        row["agree"] = None if theirs is None or ours is None else abs(theirs / ours - 1) <= TOLERANCE
        row["same_types_as_first"] = row["tensor_types"] == base_types
        table.add_row(row["label"], f"{row['bytes'] / 2**20:.2f}",
                      ", ".join(f"{k} {v}" for k, v in sorted(row["tensor_types"].items())),
                      f"{theirs:.3f}" if theirs else row["llama_cpp"].get("error", ""),
                      f"{ours:.3f}" if ours else row["quantkit_eval"].get("error", ""),
                      {None: "", True: "ok", False: "[red]no[/red]"}[row["agree"]])
    console.print(table)
    report = {"cpu": cpu, "protocol": {"windows": len(windows), "seqlen": args.seqlen, "calibration": args.calib,
                                       "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen,
                                       "imatrix_chunks": chunks, "tolerance": TOLERANCE},
              "llama_cpp": llama.record, "rows": rows}
    path = folder / "bench_gguf.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"saved {path}")


if __name__ == "__main__":
    main()
