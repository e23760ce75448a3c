"""Third-party runtimes (vLLM CPU, llama.cpp) through the runners of scripts/bench_runtimes.py, on small models.

Marked `runtimes`: each test needs its runtime's virtual environment under ~/.cache/quantkit/runtimes and is
skipped (with the reason) when it is absent; `QUANTKIT_RUNTIMES=build pytest -m runtimes` builds the absent
ones first (vLLM: a ~3.5 GB venv; llama.cpp: a CMake build), as `python scripts/bench_runtimes.py --build-only`
does.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from helpers_tokenizer import tiny_tokenizer

sys.path.insert(0, str(REPO / "scripts"))
from runtime_envs import BUILD_ENV, RunnerError, Runtime, RuntimeUnavailable, ensure, run_runner  # noqa: E402

TOLERANCE = 0.01


def runtime(name: str) -> Runtime:
    """The runtime's environment; skipped when absent unless $QUANTKIT_RUNTIMES=build (then built, or failed)."""
    if os.environ.get(BUILD_ENV) == "build":
        return ensure(name, build=True)
    try:
        return ensure(name, build=False)
    except RuntimeUnavailable as error:
        pytest.skip(f"{error}; build it with `{BUILD_ENV}=build pytest -m runtimes` or "
                    "`python scripts/bench_runtimes.py --build-only`")


def request(runner: str, model: Path, windows: list[list[int]], prompt: list[int], **options) -> dict:
    return {"runtime": runner, "model": str(model), "windows": windows, "prompt": prompt, "new_tokens": 4,
            "threads": os.cpu_count() or 1, "options": options}


def test_runner_error_is_one_line(tmp_path: Path) -> None:
    """A runner that fails reports its exception as one line instead of a traceback."""
    with pytest.raises(RunnerError) as caught:
        run_runner(request("quantkit", tmp_path / "missing", [[1, 2, 3]], [1]), timeout=300)
    assert "\n" not in str(caught.value) and str(caught.value)


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A random 2-block Llama that vLLM's CPU engine accepts (head size 64, widths multiples of the group),
    RTN W4 g64 in the GPTQ and compressed-tensors layouts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import quantkit
    from quantkit.schemes import QuantScheme

    folder = tmp_path_factory.mktemp("vllm-tiny")
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder / "float")
    tiny_tokenizer().save_pretrained(folder / "float")
    out = {}
    for layout in ("gptq", "compressed-tensors"):
        out[layout] = folder / layout
        quantkit.quantize(str(folder / "float"), method="rtn", scheme=QuantScheme(4, 64, True), output=out[layout],
                          layout=layout)
    return out


@pytest.mark.runtimes
@pytest.mark.parametrize("layout", ["gptq", "compressed-tensors"])
def test_vllm_matches_quantkit_on_tiny_model(vllm_tiny: dict[str, Path], layout: str, tmp_path: Path) -> None:
    """vLLM's CPU int4 kernel and quantkit.load score the same ids within 1% (vLLM in bfloat16, eager). vLLM's
    default W4A8 path (int8 activations) is used: on this tiny model's shapes its W4A16 path
    (VLLM_CPU_INT4_W4A8=0, which the benchmark uses on SmolLM2) dies with SIGILL on this machine's CPU."""
    engine = runtime("vllm")
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 320, (2, 64), generator=generator).tolist()
    model = vllm_tiny[layout]
    theirs = run_runner(request("vllm", model, windows, windows[0][:8], enforce_eager=True), engine, timeout=900,
                        log=tmp_path / "vllm.log")
    ours = run_runner(request("quantkit", model, windows, windows[0][:8]), timeout=600)
    assert math.isfinite(theirs["perplexity"]) and len(theirs["generated"]) == 4
    assert theirs["settings"]["quantization"]  # served by a quantized kernel, not dequantized
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) <= TOLERANCE


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from bench_runtimes import original_gguf

    path = original_gguf()
    if isinstance(path, str):
        pytest.skip(path)
    return path


@pytest.mark.runtimes
def test_llama_cpp_matches_quantkit_eval_on_gguf(smollm2_gguf: Path) -> None:
    """llama.cpp and `quantkit eval FILE.gguf` (dequantized) agree within 1% on the same WikiText-2 ids."""
    from bench_runtimes import DATA, token_ids

    if not (DATA / "wikitext-2-raw").is_dir():
        pytest.skip(f"the real text is not at {DATA}")
    engine = runtime("llama.cpp")
    windows, prompt, _ = token_ids(512, 2, 16)
    theirs = run_runner(request("llama.cpp", smollm2_gguf, windows, prompt), engine, timeout=600)
    ours = run_runner(request("quantkit-eval", smollm2_gguf, windows, prompt), timeout=600)
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) <= TOLERANCE
    assert theirs["generated"][:2] == ours["generated"][:2]


@pytest.mark.runtimes
def test_llama_quantize_plumbing(smollm2_gguf: Path, tmp_path: Path) -> None:
    """llama-quantize --pure with set embedding/output types writes a loadable, smaller file (requantized)."""
    from llama_tools import quantize

    runtime("llama.cpp")
    out = quantize(smollm2_gguf, tmp_path / "q4_0.gguf", "Q4_0", token_embedding_type="q4_0",
                   output_tensor_type="q4_0", allow_requantize=True)
    assert 0 < out.stat().st_size < smollm2_gguf.stat().st_size


@pytest.fixture(scope="module")
def quantkit_gguf_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """quantkit's own GGUF files of a random 256-wide Llama with the tiny byte-level tokenizer (llama.cpp reads
    the vocabulary quantkit builds from it): RTN on q4_k, and a native int W4 g64 checkpoint exported
    exactly as q4_0."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import saved_with_tokenizer
    from quantkit.api import export, quantize_run
    from quantkit.runplan import plan_run

    folder = tmp_path_factory.mktemp("llama-cpp-tiny")
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    torch.manual_seed(0)
    source = saved_with_tokenizer(AutoModelForCausalLM.from_config(config), folder / "float")
    files = {"q4_k": folder / "q4_k.gguf", "q4_0-export": folder / "q4_0.gguf"}
    quantize_run(str(source), plan_run("rtn", number_format="q4_k", layout="gguf"), output=files["q4_k"])
    quantize_run(str(source), plan_run("rtn", bits=4, group_size=64), output=folder / "int-g64")
    export(folder / "int-g64", files["q4_0-export"], "gguf")
    return files


@pytest.mark.runtimes
@pytest.mark.parametrize("kind", ["q4_k", "q4_0-export"])
def test_llama_cpp_loads_quantkit_gguf(quantkit_gguf_files: dict[str, Path], kind: str, tmp_path: Path) -> None:
    """llama.cpp loads quantkit's GGUF files (tensors, metadata, vocabulary) and scores the same ids as
    `quantkit eval FILE.gguf` within 1%."""
    engine = runtime("llama.cpp")
    windows = torch.randint(0, 320, (2, 128), generator=torch.Generator().manual_seed(2)).tolist()
    path = quantkit_gguf_files[kind]
    theirs = run_runner(request("llama.cpp", path, windows, windows[0][:8]), engine, timeout=600,
                        log=tmp_path / "llama.log")
    ours = run_runner(request("quantkit-eval", path, windows, windows[0][:8]), timeout=600)
    assert abs(theirs["perplexity"] / ours["perplexity"] - 1) <= TOLERANCE
