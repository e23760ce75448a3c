"""The lean decoder (quantkit.runtime.decode) against transformers' own forward and generate, on tiny random
models of every family it serves, float and quantized (fused int8 tiles), and its refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cpu_kernels import isa  # noqa: F401 - the fixture: every C kernel build this CPU runs

import quantkit
from conftest import saved_with_tokenizer, tiny_llama_config
from quantkit.api import CalibrationSpec, quantize
from quantkit.errors import QuantkitError
from quantkit.runtime.decode import FAMILIES, LeanDecoder
from quantkit.schemes import QuantScheme

PROMPT = torch.tensor([5, 17, 33, 2, 250, 41, 7, 99, 120, 3, 64, 8])
NEW_TOKENS = 12


def family_model(model_type: str, seed: int = 0, **overrides):
    """A random 2-block model of ``model_type`` (4 query heads, 2 key/value heads; Qwen2 with its q/k/v bias)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_llama_config(model_type)
    for name, value in overrides.items():
        setattr(config, name, value)
    return AutoModelForCausalLM.from_config(config).eval().requires_grad_(False)


def hf_steps(model, new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' greedy tokens and the logits of every step (its cache, its forward)."""
    out = model.generate(PROMPT[None], attention_mask=torch.ones(1, PROMPT.numel(), dtype=torch.long),
                         max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, PROMPT.numel():].tolist(), [step[0].float() for step in out.logits]


def lean_steps(decoder: LeanDecoder, tokens: list[int]) -> list[torch.Tensor]:
    """The lean decoder's logits for the prompt, then for each of ``tokens`` fed one at a time."""
    with torch.inference_mode():
        logits = [decoder.forward(PROMPT, 0)]
        for position, token in enumerate(tokens[:-1], start=PROMPT.numel()):
            logits.append(decoder.forward(torch.tensor([token]), position))
    return [step.float() for step in logits]


def assert_steps_close(lean: list[torch.Tensor], reference: list[torch.Tensor], tolerance: float) -> None:
    assert len(lean) == len(reference)
    for step, (got, want) in enumerate(zip(lean, reference)):
        error = float((got - want).norm() / want.norm())
        assert error < tolerance, f"step {step}: relative error {error:.2e}"


@pytest.mark.parametrize("c_steps", [True, False], ids=["c-steps", "torch-steps"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_float_models_decode_as_transformers_does(model_type: str, c_steps: bool) -> None:
    """Every step's logits (the prompt's, then one token at a time) against transformers' own generate; the
    decode steps' norms and attention in C (``csrc/cpu_decode.c``) or in torch."""
    model = family_model(model_type)
    with torch.inference_mode():
        tokens, reference = hf_steps(model, NEW_TOKENS)
    decoder = LeanDecoder(model, 64, c_steps=c_steps)
    assert (decoder.library is not None) == c_steps
    assert_steps_close(lean_steps(decoder, tokens), reference, 1e-5)
    assert decoder.generate(PROMPT, NEW_TOKENS) == tokens
    assert all(layer.qkv.is_fused and layer.gate_up.is_fused for layer in decoder.layers)


def test_fusing_float_projections_shares_their_weights() -> None:
    """The fused weight is the layers' own storage: the model's forward is unchanged and nothing is copied."""
    model = family_model("qwen2")
    ids = PROMPT[None]
    with torch.inference_mode():
        before = model(ids).logits
        decoder = LeanDecoder(model, 64)
        after = model(ids).logits
    assert torch.equal(before, after)
    attn = model.model.layers[0].self_attn
    storage = attn.q_proj.weight.untyped_storage().data_ptr()
    assert attn.k_proj.weight.untyped_storage().data_ptr() == storage
    assert attn.v_proj.bias.untyped_storage().data_ptr() == attn.q_proj.bias.untyped_storage().data_ptr()
    assert decoder.layers[0].qkv.is_fused


@pytest.fixture(scope="module")
def quantized_dirs(tmp_path_factory: pytest.TempPathFactory, calib_file: Path) -> dict[str, Path]:
    """RTN W4 g32 asymmetric checkpoints of two families (Qwen2: with q/k/v biases)."""
    folders = {}
    for model_type in ("llama", "qwen2"):
        source = saved_with_tokenizer(family_model(model_type), tmp_path_factory.mktemp(model_type))
        folders[model_type] = tmp_path_factory.mktemp(f"{model_type}-w4") / "q"
        quantize(str(source), method="rtn", scheme=QuantScheme(4, 32, False), output=folders[model_type],
                 calibration=CalibrationSpec(str(calib_file), 2, 32))
    return folders


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("backend", ["cpu", "cpu-int8"])
def test_quantized_models_decode_as_transformers_does(model_type: str, backend: str, quantized_dirs: dict) -> None:
    """The same kernels serve both forwards: the int8 path with its q/k/v and gate/up tiles fused into one call
    (on builds with tiles), each layer then reading views of the fused stack."""
    model = quantkit.load(quantized_dirs[model_type], backend)
    with torch.inference_mode():
        tokens, reference = hf_steps(model, NEW_TOKENS)
    decoder = LeanDecoder(model, 64)
    assert_steps_close(lean_steps(decoder, tokens), reference, 1e-3 if backend == "cpu-int8" else 1e-5)
    kernel = model.model.layers[0].self_attn.k_proj.kernel(torch.device("cpu"), torch.float32)
    fused = decoder.layers[0].qkv.is_fused
    assert fused == (kernel.tiles is not None)
    if fused:
        with torch.inference_mode():
            tokens_after, reference_after = hf_steps(model, NEW_TOKENS)  # the layers now read the fused tiles
        assert tokens_after == tokens and all(torch.equal(a, b) for a, b in zip(reference_after, reference))
        q_kernel = model.model.layers[0].self_attn.q_proj.kernel(torch.device("cpu"), torch.float32)
        storages = {k.tiles.tensors[0].untyped_storage().data_ptr() for k in (kernel, q_kernel)}
        assert len(storages) == 1  # one stack, no copy per layer


def test_unsupported_models_and_lengths_are_refused() -> None:
    with pytest.raises(QuantkitError, match="lean decoder serves .* not 'gemma2'"):
        LeanDecoder(family_model("gemma2"), 64)
    with pytest.raises(QuantkitError, match="exceeds the sliding window 8"):
        LeanDecoder(family_model("mistral", sliding_window=8), 64)
    decoder = LeanDecoder(family_model("llama"), 16)
    with pytest.raises(QuantkitError, match="exceeds max_length 16"):
        decoder.generate(PROMPT, 8)


def test_cli_generate_is_the_same_greedy_text_through_either_decoder(tiny_model_dir: Path, quantized_dirs: dict,
                                                                      tmp_path: Path) -> None:
    """`quantkit generate` on a float model and a quantized checkpoint: the lean decoder's greedy tokens are
    transformers' own (exact kernels), and the JSON holds them with the timings."""
    from test_cli import run_cli

    for target, kernel in ((tiny_model_dir, "cpu"), (quantized_dirs["llama"], "cpu")):
        runs = {}
        for decoder in ("lean", "transformers"):
            out = tmp_path / f"{decoder}.json"
            proc = run_cli("generate", str(target), "the model maps", "--max-new-tokens", "8", "--kernel", kernel,
                           "--decoder", decoder, "--json", str(out))
            assert proc.returncode == 0, proc.stderr
            runs[decoder] = json.loads(out.read_text())
            assert runs[decoder]["decoder"] == decoder and runs[decoder]["prefill_s"] > 0
            assert "decode tok/s" in proc.stdout
        assert runs["lean"]["tokens"] == runs["transformers"]["tokens"]
        assert 1 <= len(runs["lean"]["tokens"]) <= 8


def test_cli_generate_refusals(tiny_model_dir: Path, tmp_path: Path) -> None:
    from test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("generate", str(tiny_model_dir), "hi", "--decoder", "fast"), "--decoder 'fast'")
    gemma = saved_with_tokenizer(family_model("gemma2"), tmp_path / "gemma2")
    assert_one_line_error(run_cli("generate", str(gemma), "hi", "--decoder", "lean"), "not 'gemma2'")
    assert_one_line_error(run_cli("generate", str(tmp_path / "missing"), "hi"), "missing")
    assert_one_line_error(run_cli("generate", str(tiny_model_dir), ""), "prompt is empty")


@pytest.mark.usefixtures("isa")
@pytest.mark.parametrize("heads, kv_heads, head_dim, position", [(4, 2, 16, 0), (9, 3, 64, 37), (32, 8, 128, 300)])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_c_attention_step_matches_a_float64_reference(heads: int, kv_heads: int, head_dim: int, position: int,
                                                      qk_norm: bool) -> None:
    """``qk_attend_decode`` of every build this CPU runs (32 heads x 301 positions x 128 takes its threaded
    branch) against the same step in float64: per-head norms, rotation, cache write, grouped attention."""
    from quantkit.runtime.kernels import cpu_build

    library = cpu_build().library
    gen = torch.Generator().manual_seed(position)
    max_len, eps, scale = position + 5, 1e-6, head_dim**-0.5
    qkv = torch.randn((heads + 2 * kv_heads) * head_dim, generator=gen)
    keys, values = (torch.randn(kv_heads, max_len, head_dim, generator=gen) for _ in range(2))
    angles = torch.rand(head_dim // 2, generator=gen) * position
    cos, sin = torch.cat([angles.cos()] * 2), torch.cat([angles.sin()] * 2)
    norms = [torch.rand(head_dim, generator=gen) + 0.5 for _ in range(2)] if qk_norm else [None, None]

    d = qkv.double().view(-1, head_dim)
    q, k, v = d[:heads], d[heads:heads + kv_heads], d[heads + kv_heads:]
    if qk_norm:
        q, k = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double() for x, w in zip((q, k), norms))
    half = head_dim // 2
    q, k = (x * cos.double() + torch.cat((-x[:, half:], x[:, :half]), -1) * sin.double() for x in (q, k))
    want_keys, want_values = keys.double().clone(), values.double().clone()
    want_keys[:, position], want_values[:, position] = k, v
    group = heads // kv_heads
    scores = torch.einsum("hd,htd->ht", q, want_keys[:, : position + 1].repeat_interleave(group, 0)) * scale
    want = torch.einsum("ht,htd->hd", scores.softmax(-1), want_values[:, : position + 1].repeat_interleave(group, 0))

    out = torch.empty(heads * head_dim)
    pointer = [None if w is None else w.data_ptr() for w in norms]
    assert library.qk_attend_decode(qkv.data_ptr(), heads, kv_heads, head_dim, *pointer, eps, cos.data_ptr(),
                                    sin.data_ptr(), keys.data_ptr(), values.data_ptr(), max_len, position, scale,
                                    out.data_ptr()) == 0
    torch.testing.assert_close(out.double().view(heads, head_dim), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys.double(), want_keys, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.double(), want_values, rtol=0, atol=0)
    assert library.qk_attend_decode(qkv.data_ptr(), heads, kv_heads, head_dim, *pointer, eps, cos.data_ptr(),
                                    sin.data_ptr(), keys.data_ptr(), values.data_ptr(), max_len, max_len, scale,
                                    out.data_ptr()) == 1  # past the cache: refused


@pytest.mark.usefixtures("isa")
def test_c_rms_norm_matches_a_float64_reference() -> None:
    from quantkit.runtime.kernels import cpu_build

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 576, generator=gen) * 4, torch.randn(576, generator=gen)
    out = torch.empty_like(x)
    assert cpu_build().library.qk_rms_norm(x.data_ptr(), w.data_ptr(), 3, 576, 1e-5, out.data_ptr()) == 0
    xd = x.double()
    torch.testing.assert_close(out.double(), xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double(),
                               rtol=1e-5, atol=1e-6)
