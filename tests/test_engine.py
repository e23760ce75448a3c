"""The block-by-block engine against a plain replay-per-group driver written here."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from quantkit.engine import EngineOptions, capture_block_inputs, quantize_model
from quantkit.errors import QuantkitError
from quantkit.hessian import HessianAccumulator
from quantkit.models.architectures import adapter_for
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import LayerStats
from quantkit.schemes import QuantScheme

SCHEME = QuantScheme(4, 16, True)


def replay_driver(model, calib: torch.Tensor, batch: int, true_sequential: bool) -> dict:
    """GPTQ's driver as published: a full forward of the block for every group of linears."""
    adapter = adapter_for("llama")
    quantizer = make_quantizer("gptq")
    calibrated = capture_block_inputs(model, adapter, calib, batch)
    codes = {}
    with torch.no_grad():
        for i, block in enumerate(adapter.get_blocks(model)):
            inputs = calibrated.entering(i)
            stages = adapter.groups if true_sequential else [tuple(n for g in adapter.groups for n in g)]
            for stage in stages:
                accs: dict[str, HessianAccumulator] = {}
                hooks = []
                for name in stage:
                    linear = block.get_submodule(name)
                    accs[name] = HessianAccumulator(linear.in_features)
                    hooks.append(linear.register_forward_pre_hook(lambda m, a, acc=accs[name]: acc.add(a[0])))
                for h, kw in inputs:
                    block(h, **kw)
                for hook in hooks:
                    hook.remove()
                for name in stage:
                    linear = block.get_submodule(name)
                    qt = quantizer.quantize(linear.weight, LayerStats(accs[name].hessian(), accs[name].tokens), SCHEME)
                    linear.weight.copy_(qt.dequantize())
                    codes[f"model.layers.{i}.{name}"] = qt.codes
            calibrated.hidden = [block(h, **kw) for h, kw in inputs]
    return codes


@pytest.mark.parametrize("true_sequential", [True, False])
def test_engine_equals_replay_driver(true_sequential: bool) -> None:
    calib = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    reference_model, model = tiny_model(), tiny_model()
    expected = replay_driver(reference_model, calib, batch=2, true_sequential=true_sequential)
    got = quantize_model(
        model, adapter_for("llama"), make_quantizer("gptq"), lambda _: SCHEME, calib,
        EngineOptions(true_sequential=true_sequential, batch_tokens=64),
    )
    assert set(got) == set(expected)
    for name, qt in got.items():
        assert torch.equal(qt.codes, expected[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(calib).logits, reference_model(calib).logits, rtol=0, atol=0)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3"])
def test_every_declared_family_quantizes(model_type: str) -> None:
    model, reference = tiny_model(model_type), tiny_model(model_type)
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(1))
    got = quantize_model(model, adapter_for(model_type), make_quantizer("gptq"), lambda _: QuantScheme(8, 16, True), calib)
    assert len(got) == 2 * 7
    with torch.no_grad():
        ref, out = reference(calib).logits, model(calib).logits
    assert 0 < (out - ref).abs().max() < 0.05 * ref.abs().max()  # 8 bits: changed, but barely


def test_rtn_needs_no_calibration() -> None:
    model = tiny_model()
    got = quantize_model(model, adapter_for("llama"), make_quantizer("rtn"), lambda _: SCHEME, None)
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert torch.equal(layer.weight, got["model.layers.1.mlp.down_proj"].dequantize())


def test_gptq_without_calibration_is_refused() -> None:
    with pytest.raises(QuantkitError, match="needs calibration"):
        quantize_model(tiny_model(), adapter_for("llama"), make_quantizer("gptq"), lambda _: SCHEME, None)


def test_nan_weights_are_refused_naming_the_layer() -> None:
    model = tiny_model()
    model.get_submodule("model.layers.1.self_attn.k_proj").weight[0, 0] = float("nan")
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.self_attn\.k_proj.*NaN"):
        quantize_model(model, adapter_for("llama"), make_quantizer("rtn"), lambda _: SCHEME, None)


def test_group_size_that_does_not_fit_is_refused() -> None:
    with pytest.raises(QuantkitError, match="group size 128 does not fit model.layers.0.self_attn.q_proj"):
        quantize_model(tiny_model(), adapter_for("llama"), make_quantizer("rtn"), lambda _: QuantScheme(4, 128, True), None)


def test_unsupported_architecture_names_it() -> None:
    with pytest.raises(QuantkitError, match="unsupported architecture 'gpt2'"):
        adapter_for("gpt2")


@pytest.mark.parametrize("true_sequential", [True, False])
def test_bfloat16_forwards_keep_statistics_in_float64_and_solves_in_full_precision(true_sequential: bool) -> None:
    calib = torch.randint(0, 320, (6, 32), generator=torch.Generator().manual_seed(0))
    quantizer = make_quantizer("gptq")
    seen: dict[torch.dtype | None, dict[str, tuple[torch.Tensor, bool]]] = {}
    logits = {}
    for dtype in (None, torch.bfloat16):
        log = seen[dtype] = {}

        def quantize_layer(name, weight, stats, scheme, log=log):
            log[name] = (stats.hessian.clone(), torch.is_autocast_enabled("cpu"))
            return quantizer.quantize(weight, stats, scheme)

        model = tiny_model()
        quantize_model(model, adapter_for("llama"), quantizer, lambda _: SCHEME, calib,
                       EngineOptions(true_sequential=true_sequential, batch_tokens=64, quantize_layer=quantize_layer,
                                     forward_dtype=dtype))
        with torch.no_grad():
            logits[dtype] = model(calib).logits
    fp32, bf16 = seen[None], seen[torch.bfloat16]
    assert set(fp32) == set(bf16) and not any(autocast for _, autocast in bf16.values())
    # block 0's first inputs are the same float32 norm output in both runs: only the bfloat16 products differ;
    # a later block's also differ by what the bfloat16 linears computed and by the codes of the blocks before it
    for name, bound in (("model.layers.0.self_attn.q_proj", 2**-8), ("model.layers.1.mlp.down_proj", 0.25)):
        assert bf16[name][0].dtype == torch.float64
        difference = float((bf16[name][0] - fp32[name][0]).norm() / fp32[name][0].norm())
        assert 0 < difference < bound, name
    assert logits[torch.bfloat16].dtype == torch.float32
    torch.testing.assert_close(logits[torch.bfloat16], logits[None], rtol=0, atol=0.1 * float(logits[None].abs().max()))
