#!/usr/bin/env python
"""llama.cpp's own quantization tools, as built by runtime_envs.py: `llama-imatrix` on calibration text and
`llama-quantize --pure` (imatrix optional; token-embedding and output tensor types settable so that file sizes
can be matched against quantkit's), for benchmarks that compare llama.cpp's quantizers with quantkit's.

    python scripts/llama_tools.py imatrix MODEL.gguf -o imatrix.gguf [--text c4|FILE] [--chunks 64]
    python scripts/llama_tools.py quantize SRC.gguf DST.gguf Q4_K [--imatrix imatrix.gguf]
        [--token-embedding-type q8_0] [--output-tensor-type q8_0] [--allow-requantize]
    python scripts/llama_tools.py selftest   # both on the original SmolLM2 GGUF (Q4_1, so --allow-requantize)

SRC should be an f16/f32 GGUF; a quantized one is only accepted with --allow-requantize (plumbing tests).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_envs import RuntimeUnavailable, ensure, llama_tool, one_line_error  # noqa: E402

C4 = Path(__file__).resolve().parents[2] / "shared" / "data" / "c4" / "c4_validation_2k.parquet"


def tool(name: str, *args: str | Path, log: Path | None = None) -> float:
    """Run a built llama.cpp tool (the environment is built first when absent); wall seconds. A failure raises
    RuntimeError with the tool's last output line."""
    runtime = ensure("llama.cpp", build=True)
    command = [str(llama_tool(name, runtime)), *map(str, args)]
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **runtime.env})
    if log is not None:
        log.write_text(f"$ {' '.join(command)}\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed: {one_line_error(proc.stdout + proc.stderr, proc.returncode)}")
    return time.perf_counter() - start


def calibration_text(source: str | Path, output: Path, documents: int = 400) -> Path:
    """``source`` as plain text for llama-imatrix: 'c4' (the first ``documents`` C4 validation documents from
    ../shared/data, blank-line separated) or a text file used as it is."""
    if str(source) != "c4":
        return Path(source)
    import pyarrow.parquet as pq

    texts = pq.read_table(C4, columns=["text"]).column("text").to_pylist()[:documents]
    output.write_text("\n\n".join(texts))
    return output


def imatrix(model: Path, output: Path, text: str | Path = "c4", chunks: int | None = 64, ctx: int = 512,
            threads: int | None = None) -> Path:
    """The importance matrix of ``model`` over ``text`` (``chunks`` windows of ``ctx`` tokens), at ``output``."""
    with tempfile.TemporaryDirectory() as folder:
        corpus = calibration_text(text, Path(folder) / "calibration.txt")
        args: list[str | Path] = ["-m", model, "-f", corpus, "-o", output, "-c", str(ctx), "-t", str(threads or os.cpu_count())]
        tool("llama-imatrix", *args, *(["--chunks", str(chunks)] if chunks else []), log=output.with_suffix(".log"))
    return output


def quantize(source: Path, output: Path, gguf_type: str, imatrix_file: Path | None = None,
             token_embedding_type: str | None = None, output_tensor_type: str | None = None,
             allow_requantize: bool = False, pure: bool = True) -> Path:
    """``llama-quantize [--pure] ... SOURCE OUTPUT TYPE``; ``pure`` gives every tensor ``gguf_type`` except those
    set by ``token_embedding_type``/``output_tensor_type`` (no k-quant mixture)."""
    flags: list[str | Path] = ["--pure"] if pure else []
    flags += ["--allow-requantize"] if allow_requantize else []
    flags += ["--imatrix", imatrix_file] if imatrix_file else []
    flags += ["--token-embedding-type", token_embedding_type] if token_embedding_type else []
    flags += ["--output-tensor-type", output_tensor_type] if output_tensor_type else []
    tool("llama-quantize", *flags, source, output, gguf_type, str(os.cpu_count()), log=output.with_suffix(".log"))
    return output


def selftest(folder: Path) -> None:
    """imatrix and an imatrix-weighted pure Q4_K requantization of the original SmolLM2 GGUF (plumbing only)."""
    from bench_runtimes import original_gguf

    source = original_gguf()
    if isinstance(source, str):
        raise RuntimeError(source)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    matrix = imatrix(Path(source), folder / "imatrix.gguf", chunks=8)
    print(f"imatrix: {matrix} ({matrix.stat().st_size} bytes, {time.perf_counter() - start:.1f} s)")
    out = quantize(Path(source), folder / "smollm2-q4_k-pure.gguf", "Q4_K", matrix, "q8_0", "q8_0", allow_requantize=True)
    print(f"quantize: {out} ({out.stat().st_size / 2**20:.1f} MiB from {Path(source).stat().st_size / 2**20:.1f} MiB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("imatrix", help="llama-imatrix on calibration text")
    p.add_argument("model", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--text", default="c4", help="c4 (../shared/data) or a text file")
    p.add_argument("--chunks", type=int, default=64)
    p.add_argument("--ctx", type=int, default=512)
    p = commands.add_parser("quantize", help="llama-quantize --pure")
    p.add_argument("source", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("type", help="Q4_K, Q4_0, Q8_0, ... (llama-quantize's names)")
    p.add_argument("--imatrix", type=Path)
    p.add_argument("--token-embedding-type")
    p.add_argument("--output-tensor-type")
    p.add_argument("--allow-requantize", action="store_true")
    p.add_argument("--not-pure", action="store_true", help="llama.cpp's usual per-tensor type mixture")
    p = commands.add_parser("selftest", help="both tools on the original SmolLM2 GGUF")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "llama_tools")
    args = parser.parse_args()
    try:
        if args.command == "imatrix":
            print(imatrix(args.model, args.output, args.text, args.chunks, args.ctx))
        elif args.command == "quantize":
            print(quantize(args.source, args.output, args.type, args.imatrix, args.token_embedding_type,
                           args.output_tensor_type, args.allow_requantize, pure=not args.not_pure))
        else:
            selftest(args.out)
    except (RuntimeError, RuntimeUnavailable) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
