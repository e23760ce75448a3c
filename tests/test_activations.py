"""Activation-aware and static-activation methods: AWQ and SmoothQuant preserve the float function, AWQ's searches
pick what they claim, static scales match independent computations, FP8 rounds as torch's float8 does, and
static scales survive every layout (quantkit.load gives the fake-quantized model's logits)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, run_cli
from test_transforms import _calibration, _logits, _model

from quantkit import api
from quantkit.actcalib import observed_bound, static_scale
from quantkit.actquant import InputQuantization, StaticActivations, activation_scheme, quantize_static
from quantkit.engine.passes import InputStatistics
from quantkit.errors import QuantkitError
from quantkit.formats.fp8 import FP8QuantizedTensor
from quantkit.formats.grid import make_grid, quantize_groups
from quantkit.kvcache import KVCacheQuantization
from quantkit.layouts import get_layout
from quantkit.models.architectures import adapter_for
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.gptq import GPTQQuantizer
from quantkit.quantizers.rtn import RTNQuantizer
from quantkit.schemes import QuantScheme
from quantkit.transforms import make_transform
from quantkit.transforms.awq import candidate_scales, search_clip, search_scale
from quantkit.transforms.base import TransformContext
from quantkit.transforms.prepare import fold_block_norms
from quantkit.transforms.rewrite import attach_online, fuse
from quantkit.transforms.scaling import fake_quantize_weight

ADAPTER = adapter_for("llama")
W4G16 = QuantScheme(4, 16, True)
W8 = QuantScheme(8, -1, True)
W4 = QuantScheme(4, -1, True)
FP8 = QuantScheme(8, -1, True, "fp8")
FP8_TENSOR = QuantScheme(8, -1, True, "fp8", block_rows=-1)
FP8_BLOCK = QuantScheme(8, 32, True, "fp8", block_rows=32)  # the tiny model's 128x128
FP8_GROUP_ACT = activation_scheme(8, "fp8", 32)  # dynamic per token and group, as beside block weights
INT8, FP8_ACT, INT4 = activation_scheme(8, "int"), activation_scheme(8, "fp8"), activation_scheme(4, "int")
NVFP4 = QuantScheme.for_format("nvfp4", 4, None, None, 16, True)
NVFP4_ACT = activation_scheme(4, "nvfp4")
TINY = {"nsamples": 4, "seqlen": 32, "batch_size": 2}
OTHER_SIZES = {"intermediate_size": 168, "num_attention_heads": 3, "num_key_value_heads": 1, "hidden_size": 48}


# --- AWQ and SmoothQuant --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["awq", "smoothquant", "mergequant"])
@pytest.mark.parametrize("config", [{}, OTHER_SIZES], ids=["gqa-2", "gqa-3-to-1"])
def test_folded_scales_preserve_the_float_function(name, config):
    """Learned in float32, the scales fused into a float64 copy give the same logits (before any clipping or
    quantization), and they are not the identity."""
    model = _model(**config)
    reference = copy.deepcopy(model).double()
    expected = _logits(reference)
    fold_block_norms(model, ADAPTER)
    learned = make_transform(name, **TINY).learn(TransformContext(model, ADAPTER, W4G16, INT4, _calibration()))
    fold_block_norms(reference, ADAPTER)
    assert fuse(reference, ADAPTER, learned.rewrite) == {}  # nothing left at run time
    torch.testing.assert_close(_logits(reference), expected, rtol=0, atol=1e-9)
    block = learned.rewrite.blocks[0]
    assert block.value_scale.numel() == reference.model.layers[0].self_attn.v_proj.out_features  # per kv channel
    for scale in (block.attention_scale, block.value_scale, block.mlp_scale, block.up_scale):
        assert (scale > 0).all() and not torch.allclose(scale, torch.ones_like(scale))


@pytest.mark.parametrize("name", ["hadamard+smoothquant", "smoothquant+hadamard"])
def test_composed_transforms_preserve_the_float_function_and_skip_inputs_with_online_maps(name):
    """Each step fused in turn (in float64) gives the same logits with the online maps running; a scaling step
    after the rotation leaves down's input (which has an online Hadamard) alone."""
    model = _model().double()
    expected = _logits(model)
    rotated = copy.deepcopy(model)
    alone = make_transform("hadamard").apply(TransformContext(rotated, ADAPTER, W4G16, INT4, _calibration()))
    applied = make_transform(name, **TINY).apply(TransformContext(model, ADAPTER, W4G16, INT4, _calibration()))
    assert applied.record["name"] == name and [step["name"] for step in applied.record["steps"]] == name.split("+")
    assert set(applied.online) == set(alone.online) and applied.has_online()
    attach_online(model, applied.online)
    torch.testing.assert_close(_logits(model), expected, rtol=0, atol=1e-6)  # as the Hadamard transform alone
    rotated_first = name.startswith("hadamard")
    for i in range(2):
        block, reference = model.model.layers[i], rotated.model.layers[i]
        # scaled after the rotation: q/k/v's input (on rotated channels), never down's (its online map); scaled
        # before it: down's input (SmoothRot), while q/k/v's scale went into the norm the rotation folds back
        same = {"q_proj": torch.allclose(block.self_attn.q_proj.weight, reference.self_attn.q_proj.weight, atol=1e-12),
                "down_proj": torch.allclose(block.mlp.down_proj.weight, reference.mlp.down_proj.weight, atol=1e-12)}
        assert same == {"q_proj": not rotated_first, "down_proj": rotated_first}


def test_smoothquant_alpha_reaches_the_scales_and_belongs_to_smoothquant():
    """SmoothQuant's input scale is ``max|W|^(1-α) / max|X|^α`` per channel: the α = 0.3 scale and the weights
    fix ``max|X|``, from which the α = 0.8 scale follows (block 0's attention input)."""
    model = _model()
    fold_block_norms(model, ADAPTER)
    ctx = TransformContext(model, ADAPTER, W4G16, INT8, _calibration())
    low, high = (make_transform("smoothquant", alpha=a, **TINY).learn(ctx).rewrite.blocks[0].attention_scale.double()
                 for a in (0.3, 0.8))
    attention = model.model.layers[0].self_attn
    w_max = torch.cat([attention.get_submodule(n).weight for n in ("q_proj", "k_proj", "v_proj")]).abs().amax(0)
    log_w = w_max.double().log()
    log_x = (0.7 * log_w - low.log()) / 0.3
    torch.testing.assert_close(high.log(), 0.2 * log_w - 0.8 * log_x, rtol=0, atol=1e-4)
    assert not torch.allclose(low, high)
    assert make_transform("hadamard+smoothquant", alpha=0.7).steps[1].alpha == 0.7
    for name in ("awq", "hadamard+awq"):
        with pytest.raises(QuantkitError, match="--transform-alpha is SmoothQuant's migration strength"):
            make_transform(name, alpha=0.7)


def test_composed_transforms_refuse_two_rotations_or_two_calibrated_steps():
    for name, message in [("hadamard+flatquant", "both rotate"), ("awq+smoothquant", "both read calibration"),
                          ("awq+awq", "different transforms"), ("hadamard+median", "unknown transform 'median'")]:
        with pytest.raises(QuantkitError, match=message):
            make_transform(name)
    with pytest.raises(QuantkitError, match="takes no training budget"):
        make_transform("hadamard", nsamples=4)


def test_awq_apply_keeps_the_head_tied_and_clamps_all_but_query_and_key():
    model = _model()
    before = copy.deepcopy(model)
    applied = make_transform("awq", **TINY).apply(TransformContext(model, ADAPTER, W4G16, None, _calibration()))
    assert not applied.has_online() and applied.record["name"] == "awq"
    assert model.lm_head.weight is model.model.embed_tokens.weight  # scaling transforms leave the head alone
    assert torch.equal(model.model.norm.weight, before.model.norm.weight)
    for name in ("q_proj", "k_proj"):  # scaled (their norm moved), never clamped: the same function as before
        scaled = model.model.layers[0].self_attn.get_submodule(name).weight
        original = before.model.layers[0].self_attn.get_submodule(name).weight * before.model.layers[0].input_layernorm.weight
        norm = model.model.layers[0].input_layernorm.weight
        torch.testing.assert_close(scaled * norm, original, rtol=1e-5, atol=1e-6)
    clipped = 0
    for name in ("self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        for i in range(2):
            new, old = (m.model.layers[i].get_submodule(name).weight for m in (model, before))
            clipped += int((new.abs().amax(dim=1) < old.abs().amax(dim=1) * 0.999).sum())
    assert clipped > 0, "the clipping search shrank some ranges"


def test_awq_scale_search_never_loses_to_no_scaling():
    """The identity is a candidate: the chosen scale's output error is at most the unscaled one's (an
    independent evaluation of both)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    x[:, :4] *= 20  # salient channels: scaling their weights up pays
    w = torch.randn(32, 64, generator=generator)

    def output(weights):
        return x @ weights[0].T

    def error(s):
        return (output([fake_quantize_weight(w * s, W4G16) / s]) - output([w])).pow(2).mean()

    s = search_scale(x.abs().mean(0), w.abs().mean(0), [w], output, lambda v: v, W4G16, 20)
    assert error(s) <= error(torch.ones(64)) * (1 + 1e-6)
    assert error(s) < error(torch.ones(64)) * 0.75
    assert len(candidate_scales(torch.rand(8) + 0.1, torch.rand(8) + 0.1, 20)) == 21


def test_awq_clip_search_lowers_each_groups_output_error():
    generator = torch.Generator().manual_seed(1)
    w = torch.randn(16, 48, generator=generator)
    w[:, 5] *= 6  # an outlier column: clipping it pays
    x = torch.randn(128, 48, generator=generator)
    bound = search_clip(w, x, W4G16, 20)
    amax = w.abs().reshape(16, 3, 16).amax(-1)
    assert bound.shape == (16, 3) and (bound <= amax).all() and (bound >= amax * 0.5).all()

    def group_error(weight):
        delta = (fake_quantize_weight(weight, W4G16) - w).reshape(16, 3, 16)
        return torch.einsum("tgc,ogc->ogt", x.reshape(128, 3, 16), delta).pow(2).mean(-1)

    limit = bound.repeat_interleave(16, dim=1)
    assert (group_error(w.clamp(-limit, limit)) <= group_error(w) + 1e-6).all()
    assert (bound < amax).any()


def test_transforms_reading_windows_once_refuse_epochs():
    with pytest.raises(QuantkitError, match="reads its calibration windows once"):
        make_transform("awq", epochs=2)


@pytest.mark.parametrize("act", [None, activation_scheme(4, "nvfp4")], ids=["weights-only", "nvfp4"])
def test_mergequant_needs_int_or_fp8_activations(act):
    with pytest.raises(QuantkitError, match=r"transform mergequant merges static activation steps .* int or fp8"):
        make_transform("mergequant", **TINY).learn(TransformContext(_model(), ADAPTER, W4G16, act, _calibration()))
    for name in ("mergequant", "hadamard+mergequant"):  # refused when the run is planned, before any loading
        with pytest.raises(QuantkitError, match="transform mergequant merges static activation steps"):
            api.plan_run("rtn", W4G16, act_scheme=act, transform=make_transform(name))


def test_mergequant_beats_plain_static_w4a4_on_outlier_channels(tiny_model_dir, calib_file, tmp_path):
    """Channels 10x larger than the rest (as LLM norms make them) spoil one static int4 scale per input; with
    the steps merged, W4A4 with one static scale per input is nearer the float model's logits than without
    (by more than 40%), and than per-token dynamic int4 activations."""
    model_dir = tmp_path / "outliers"
    shutil.copytree(tiny_model_dir, model_dir)
    weights = load_file(model_dir / "model.safetensors")
    for i in range(2):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[f"model.layers.{i}.{norm}.weight"][:3] *= 10
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    reference = api.load_model(str(model_dir)).model
    with torch.no_grad():
        expected = reference(input_ids=_tokens()).logits.double()

    def error(transform, static=StaticActivations("tensor", "mse")):
        result = _quantize(model_dir, calib_file, None, W4, INT4, static, transform=transform)
        with torch.no_grad():
            return float((result.model(input_ids=_tokens()).logits.double() - expected).pow(2).mean())

    merged = error("mergequant")
    assert merged < 0.6 * error(None) and merged < error(None, static=None)


# --- static scales ------------------------------------------------------------------------------------------------


def _statistics(x: torch.Tensor) -> InputStatistics:
    a = x.abs()
    return InputStatistics(a.sum(0, dtype=torch.float64), a.amax(0), x.shape[0], [x])


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_observers_match_independent_computations(granularity):
    x = torch.randn(1000, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    x[3, 2] = 40.0  # one outlier token
    stats = _statistics(x)
    per_channel = granularity == "channel"
    minmax = observed_bound(stats, INT8, StaticActivations(granularity, "minmax"))
    torch.testing.assert_close(minmax, x.abs().amax(0) if per_channel else x.abs().amax().reshape(1))
    pct = observed_bound(stats, INT8, StaticActivations(granularity, "percentile", 99.0))
    values = x.abs().double().numpy() if per_channel else x.abs().double().reshape(-1, 1).numpy()
    import numpy as np

    expected = torch.from_numpy(np.percentile(values, 99.0, axis=0, method="inverted_cdf")).float()
    torch.testing.assert_close(pct, expected)
    mse = observed_bound(stats, INT8, StaticActivations(granularity, "mse"))

    def err(bound):
        return (quantize_static(x, INT8, bound / 127) - x).pow(2).sum()

    assert err(mse) <= err(minmax) and (mse <= minmax).all()
    scale = static_scale("layer", stats, INT8, StaticActivations(granularity, "minmax"))
    torch.testing.assert_close(scale, minmax / 127)


def test_static_quantization_matches_the_float64_and_float8_references():
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3)) * 3
    scale = torch.tensor([0.02])
    reference = (x.double() / 0.02).round().clamp(-128, 127) * 0.02
    torch.testing.assert_close(quantize_static(x, INT8, scale).double(), reference, rtol=1e-6, atol=1e-7)
    fp8 = (x / 0.02).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.02
    assert torch.equal(quantize_static(x, FP8_ACT, scale), fp8)
    int4 = quantize_static(x, activation_scheme(4, "int"), torch.tensor([1.0]))
    assert int4.min() >= -8 and int4.max() <= 7


def test_missing_or_non_finite_statistics_are_one_line_errors():
    with pytest.raises(QuantkitError, match="no calibration token reached the input of L"):
        static_scale("L", None, INT8, StaticActivations())
    x = torch.ones(4, 3)
    x[1, 1] = float("nan")
    with pytest.raises(QuantkitError, match="inputs of L hold NaN or infinite values"):
        static_scale("L", _statistics(x), INT8, StaticActivations())
    with pytest.raises(QuantkitError, match="static activation scales are for int or fp8"):
        StaticActivations().check_scheme(activation_scheme(4, "mxfp4"))
    with pytest.raises(QuantkitError, match="nvfp4 activations take one static scale per tensor from the minmax"):
        StaticActivations("channel").check_scheme(NVFP4_ACT)


def test_static_nvfp4_rounds_blocks_against_the_calibrated_global_scale():
    """An independent float64 NVFP4 reference: per 16 elements an E4M3 block scale of ``amax · G / 6`` (G the
    static divisor ``1 / scale``, the block scale saturating at 448), then the nearest E2M1 value."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(5)) * 2
    x[0, 3] = 40.0  # beyond the calibrated range: its block saturates
    scale = torch.tensor([10.0 / (448 * 6)])
    divisor = 1 / scale.double()
    blocks = x.double().reshape(8, 4, 16)
    block_scale = (blocks.abs().amax(-1, keepdim=True) * divisor / 6).clamp(max=448).float().to(torch.float8_e4m3fn)
    step = block_scale.double() / divisor
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    scaled = (blocks / step).clamp(-6, 6)
    nearest = grid[(scaled.abs()[..., None] - grid).abs().argmin(-1)] * scaled.sign()
    reference = (nearest * step).reshape(8, 64)
    torch.testing.assert_close(quantize_static(x, NVFP4_ACT, scale).double(), reference, rtol=1e-6, atol=1e-7)
    assert quantize_static(x, NVFP4_ACT, scale)[0, 3] == float(448 * 6 * scale)  # clipped to the calibrated range


# --- FP8 weights ----------------------------------------------------------------------------------------------------


def test_fp8_grid_rounds_as_torchs_float8_cast_and_gptq_beats_rtn():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    qt = RTNQuantizer().quantize(w, LayerStats(), FP8)
    assert isinstance(qt, FP8QuantizedTensor)
    scale = w.abs().amax(1, keepdim=True) / 448
    torch.testing.assert_close(qt.dequantize(), (w / scale).to(torch.float8_e4m3fn).float() * scale)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(5)) @ torch.randn(64, 64,
                                                                                       generator=torch.Generator().manual_seed(6))
    hessian = (2 * x.T.double() @ x.double() / 512)
    stats = LayerStats(hessian=hessian, tokens=512)
    gptq = GPTQQuantizer().quantize(w, stats, FP8).dequantize()

    def out_error(q):
        return (x @ (q - w).T).pow(2).mean()

    assert out_error(gptq) < out_error(qt.dequantize())
    params = make_grid(FP8, w).fit(w.reshape(24, 1, 64))
    torch.testing.assert_close(params[0].reshape(24, 1), scale)
    assert torch.equal(quantize_groups(make_grid(FP8, w), w)[2], qt.dequantize())


def _fp8_reference(w: torch.Tensor, rows: int, columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scales (amax / 448 over each ``rows x columns`` block, in float64) and the weights they round to,
    block by block with torch's float8 cast."""
    out, n = w.shape
    scales = torch.empty(-(-out // rows), -(-n // columns), dtype=torch.float64)
    values = torch.empty_like(w)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            block = w[i * rows:(i + 1) * rows, j * columns:(j + 1) * columns].double()
            scales[i, j] = block.abs().max() / 448
            values[i * rows:(i + 1) * rows, j * columns:(j + 1) * columns] = (
                (block / scales[i, j]).float().to(torch.float8_e4m3fn).double() * scales[i, j]).float()
    return scales, values


@pytest.mark.parametrize(("scheme", "rows", "columns"), [(QuantScheme(8, 128, True, "fp8", 128), 128, 128),
                                                        (QuantScheme(8, -1, True, "fp8", -1), 300, 256),
                                                        (QuantScheme(8, 64, True, "fp8", -1), 300, 64)],
                         ids=["block-128x128", "tensor", "group-over-all-rows"])
def test_fp8_block_and_tensor_scales_match_a_float64_reference(scheme, rows, columns):
    w = torch.randn(300, 256, generator=torch.Generator().manual_seed(8))  # 300 rows: a partial last row block
    w[7, 3] = 40.0  # one block's maximum
    qt = RTNQuantizer().quantize(w, LayerStats(), scheme)
    scales, values = _fp8_reference(w, rows, columns)
    assert qt.scales.shape == scales.shape == _scale_shape(scheme, w.shape)
    torch.testing.assert_close(qt.scales.double(), scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(qt.dequantize(), values, rtol=1e-6, atol=1e-7)
    x = torch.randn(512, 256, generator=torch.Generator().manual_seed(9))
    stats = LayerStats(hessian=2 * x.T.double() @ x.double() / 512, tokens=512)
    gptq = GPTQQuantizer().quantize(w, stats, scheme)
    assert gptq.scales.shape == scales.shape
    codes = gptq.dequantize() / gptq.column_scales()  # every weight is an E4M3 value times its block's scale
    torch.testing.assert_close(codes, codes.to(torch.float8_e4m3fn).float(), rtol=1e-5, atol=1e-6)


def _scale_shape(scheme: QuantScheme, shape: tuple[int, int]) -> tuple[int, int]:
    return scheme.num_row_blocks(shape[0]), scheme.num_groups(shape[1])


def test_rows_share_scales_in_fp8_only_and_compressed_tensors_refuses_other_geometries():
    with pytest.raises(QuantkitError, match="in fp8 only"):
        QuantScheme(4, 128, True, "int", block_rows=128)
    with pytest.raises(QuantkitError, match="block rows must be"):
        QuantScheme(8, 128, True, "fp8", block_rows=0)
    with pytest.raises(QuantkitError, match="per tensor, channel, group or 2-D block"):
        api.plan_run("rtn", QuantScheme(8, 32, True, "fp8", block_rows=-1), layout="compressed-tensors")


# --- checkpoints ----------------------------------------------------------------------------------------------------


def _tokens() -> torch.Tensor:
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(7))


def _quantize(tiny_model_dir, calib_file, out, scheme, act, static, layout="native", method="rtn", transform=None):
    return api.quantize(str(tiny_model_dir), method=method, scheme=scheme, output=out, layout=layout, act_scheme=act,
                        act_static=static, calibration=api.CalibrationSpec(str(calib_file), 4, 32),
                        transform=None if transform is None else make_transform(transform, **TINY))


CASES = [  # (layout, weights, activations, static, method, transform)
    ("native", W8, INT8, StaticActivations("tensor", "minmax"), "rtn", None),
    ("native", W4G16, INT8, StaticActivations("channel", "percentile"), "gptq", None),
    ("native", FP8, FP8_ACT, StaticActivations("tensor", "mse"), "gptq", None),
    ("native", QuantScheme(4, -1, True), INT4, StaticActivations("channel", "mse"), "rtn", None),
    ("native", QuantScheme(4, -1, True), INT4, StaticActivations("tensor", "mse"), "gptq", "mergequant"),
    ("compressed-tensors", W8, INT8, StaticActivations("tensor", "minmax"), "gptq", "smoothquant"),
    ("compressed-tensors", W8, INT8, None, "rtn", None),
    ("compressed-tensors", FP8, FP8_ACT, StaticActivations("tensor", "percentile"), "rtn", None),
    ("compressed-tensors", FP8, FP8_ACT, None, "gptq", None),
    ("compressed-tensors", FP8_TENSOR, FP8_ACT, StaticActivations("tensor", "minmax"), "gptq", None),
    ("compressed-tensors", FP8_BLOCK, FP8_GROUP_ACT, None, "rtn", None),
    ("native", FP8_BLOCK, FP8_ACT, StaticActivations("tensor", "minmax"), "gptq", None),
    ("compressed-tensors", W4G16, INT8, StaticActivations("tensor", "minmax"), "gptq", "awq"),
    ("native", NVFP4, NVFP4_ACT, StaticActivations("tensor", "percentile"), "rtn", None),
    ("compressed-tensors", NVFP4, NVFP4_ACT, StaticActivations("tensor", "minmax"), "gptq", None),
]


@pytest.mark.parametrize(("layout", "scheme", "act", "static", "method", "transform"), CASES,
                         ids=[f"{c[0]}-{c[1].format}{c[1].bits}{'' if c[1].block_rows == 1 else f'x{c[1].block_rows}'}-a{c[2].format}-{c[3].granularity if c[3] else 'dynamic'}"
                              f"-{c[4]}{'-' + c[5] if c[5] else ''}" for c in CASES])
def test_static_scales_round_trip_and_load_as_the_fake_quantized_model(tiny_model_dir, calib_file, tmp_path, layout,
                                                                       scheme, act, static, method, transform):
    out = tmp_path / "ckpt"
    result = _quantize(tiny_model_dir, calib_file, out, scheme, act, static, layout, method, transform)
    with torch.no_grad():
        expected = result.model(input_ids=_tokens()).logits
        for handle in result.input_quantizers:
            handle.remove()
        weight_only = result.model(input_ids=_tokens()).logits
    assert not torch.allclose(expected, weight_only, atol=1e-4), "the activations really are quantized"
    loaded = api.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_tokens()).logits, expected, rtol=0, atol=1e-5)
    layer = loaded.get_submodule("model.layers.1.mlp.down_proj")
    assert layer.input_static == static
    if static is not None:
        stored = load_file(out / "model.safetensors")
        # compressed-tensors keeps NVFP4's divisor (input_global_scale), the reciprocal of quantkit's scale
        name = "input_global_scale" if layout == "compressed-tensors" and act.format == "nvfp4" else "input_scale"
        down = stored[f"model.layers.1.mlp.down_proj.{name}"]
        torch.testing.assert_close(1 / down if name == "input_global_scale" else down, layer.input_scale, rtol=1e-6, atol=0)
        assert torch.equal(stored[f"model.layers.0.self_attn.q_proj.{name}"],
                           stored[f"model.layers.0.self_attn.k_proj.{name}"])  # one input, one scale
    assert get_layout(layout).input_quantization(
        json.loads((out / "config.json").read_text())["quantization_config"]) == InputQuantization(act, static)
    native = tmp_path / "native"
    api.export(out, native, "native")
    with torch.no_grad():
        torch.testing.assert_close(api.load(native)(input_ids=_tokens()).logits, expected, rtol=0, atol=1e-5)


def test_compressed_tensors_w8a8_config_is_what_vllm_reads(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "ct"
    _quantize(tiny_model_dir, calib_file, out, W8, INT8, StaticActivations(), "compressed-tensors")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    group = qc["config_groups"]["group_0"]
    assert group["format"] == "int-quantized" and group["input_activations"] == {
        "num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": "tensor", "dynamic": False,
        "observer": "minmax"}
    stored = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj"
    assert stored[f"{name}.weight"].dtype == torch.int8 and stored[f"{name}.weight_scale"].shape == (64, 1)
    assert stored[f"{name}.input_scale"].shape == (1,) and stored[f"{name}.input_scale"].dtype == torch.float32


@pytest.mark.parametrize(("scheme", "act", "static", "weights", "inputs", "scale_shape"), [
    (FP8_TENSOR, FP8_ACT, StaticActivations(), {"strategy": "tensor", "group_size": None, "block_structure": None},
     {"strategy": "tensor", "dynamic": False, "group_size": None}, (1,)),
    (FP8_BLOCK, FP8_GROUP_ACT, None, {"strategy": "block", "group_size": None, "block_structure": [32, 32]},
     {"strategy": "group", "dynamic": True, "group_size": 32}, (5, 2)),
], ids=["tensor", "block"])
def test_compressed_tensors_fp8_tensor_and_block_configs_are_llm_compressors_presets(
        tiny_model_dir, calib_file, tmp_path, scheme, act, static, weights, inputs, scale_shape):
    out = tmp_path / "ct"
    _quantize(tiny_model_dir, calib_file, out, scheme, act, static, "compressed-tensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert {key: group["weights"][key] for key in weights} == weights
    assert {key: group["input_activations"][key] for key in inputs} == {**inputs}
    stored = load_file(out / "model.safetensors")
    up = "model.layers.0.mlp.up_proj"  # [160, 64]
    assert stored[f"{up}.weight"].dtype == torch.float8_e4m3fn and stored[f"{up}.weight_scale"].shape == scale_shape


def test_compressed_tensors_nvfp4_w4a4_config_is_llm_compressors_preset(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "ct"
    _quantize(tiny_model_dir, calib_file, out, NVFP4, NVFP4_ACT, StaticActivations(), "compressed-tensors")
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "nvfp4-pack-quantized" and group["input_activations"] == {
        "num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
        "dynamic": "local", "observer": "minmax"}
    stored = load_file(out / "model.safetensors")
    scale = stored["model.layers.0.mlp.down_proj.input_global_scale"]
    assert scale.shape == (1,) and scale.dtype == torch.float32 and "model.layers.0.mlp.down_proj.input_scale" not in stored


def test_compressed_tensors_nvfp4_activations_need_a_static_global_scale():
    with pytest.raises(QuantkitError, match="compressed-tensors NVFP4 activations need a calibrated global scale"):
        api.plan_run("rtn", NVFP4, layout="compressed-tensors", act_scheme=NVFP4_ACT)


@pytest.mark.parametrize(("layout", "act", "static", "message"), [
    ("gptq", INT8, StaticActivations(), "the gptq layout cannot record"),
    ("compressed-tensors", INT8, StaticActivations("channel"), r"per tensor \(vLLM refuses per-channel"),
    ("compressed-tensors", activation_scheme(4, "int"), None, "8-bit int or fp8 activations"),
])
def test_layouts_refuse_activations_they_cannot_record_before_work(tiny_model_dir, tmp_path, layout, act, static, message):
    with pytest.raises(QuantkitError, match=message):
        api.plan_run("rtn", W8, layout=layout, act_scheme=act, act_static=static)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.input_scale", torch.tensor([float("nan")])), "contains NaN"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.input_scale", torch.tensor([-1.0])), "not positive"),
    (lambda t: t.pop("model.layers.0.mlp.up_proj.input_scale"), "missing 1 tensor"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.input_scale", torch.ones(2)), "has shape [2]"),
])
def test_bad_static_scales_in_a_checkpoint_are_refused(tiny_model_dir, calib_file, tmp_path, edit, message):
    out = tmp_path / "ckpt"
    _quantize(tiny_model_dir, calib_file, out, W8, INT8, StaticActivations())
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run_cli("inspect", str(out)), message)


def test_cli_static_w8a8_and_its_refusals(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "w8a8"
    proc = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "8", "--group-size", "-1",
                   "--act-bits", "8", "--act-static", "--act-observer", "percentile", "--act-percentile", "99.9",
                   "--transform", "smoothquant", "--transform-nsamples", "4", "--transform-seqlen", "32",
                   "--transform-alpha", "0.6",
                   "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32", "--layout", "compressed-tensors",
                   "--kv-format", "fp8", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "a8 int static per-tensor" in proc.stdout and "fp8 8-bit, static scales per tensor" in proc.stdout
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["input_activations"]["observer"] == "percentile"
    assert qc["kv_cache_scheme"]["type"] == "float"
    for args, message in [
        (["--act-observer", "mse"], "need --act-static"),
        (["--transform-alpha", "0.6"], "need --transform"),
        (["--transform", "awq", "--transform-alpha", "0.6"], "SmoothQuant's migration strength"),
        (["--transform", "smoothquant", "--transform-alpha", "1.5"], "--transform-alpha 1.5 is not allowed"),
        (["--act-static"], "need --act-bits"),
        (["--act-bits", "8", "--act-static", "--act-granularity", "channel", "--layout", "compressed-tensors"],
         "per tensor"),
        (["--act-bits", "8", "--act-static", "--act-observer", "median"], "--act-observer 'median' is not allowed"),
    ]:
        bad = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "8", "-o", str(tmp_path / "bad"),
                      *args)
        assert_one_line_error(bad, message)
        assert not (tmp_path / "bad").exists()


def test_cli_fp8_block_weights_and_their_refusals(tiny_model_dir, calib_file, tmp_path):
    out = tmp_path / "fp8-block"
    common = ("--method", "rtn", "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32")
    proc = run_cli("quantize", str(tiny_model_dir), *common, "--format", "fp8", "--group-size", "32", "--block-rows",
                   "32", "--act-bits", "8", "--act-group-size", "32", "--layout", "compressed-tensors", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "fp8 32x32 blocks + a8 fp8 g32" in proc.stdout
    assert "32x32 blocks" in run_cli("inspect", str(out)).stdout
    for args, message in [(["--block-rows", "32"], "in fp8 only"),
                          (["--format", "fp8", "--block-rows", "-1", "--group-size", "32", "--layout",
                            "compressed-tensors"], "per tensor, channel, group or 2-D block")]:
        bad = run_cli("quantize", str(tiny_model_dir), *common, *args, "-o", str(tmp_path / "bad"))
        assert_one_line_error(bad, message)
        assert not (tmp_path / "bad").exists()


def test_static_activations_refuse_streaming(tiny_model_dir, tmp_path):
    with pytest.raises(QuantkitError, match="--offload disk cannot work with static activation scales"):
        api.quantize(str(tiny_model_dir), method="rtn", scheme=W8, act_scheme=INT8, act_static=StaticActivations(),
                     output=tmp_path / "s", offload="disk", calibration=api.CalibrationSpec("synthetic", 2, 16))


def test_native_record_round_trips_and_old_records_read_as_dynamic():
    inputs = InputQuantization(FP8_ACT, StaticActivations("channel", "mse", 99.5))
    assert InputQuantization.from_record(json.loads(json.dumps(inputs.record()))) == inputs
    old = {"bits": 4, "group_size": -1, "symmetric": True, "format": "int"}  # before static scales existed
    assert InputQuantization.from_record(old) == InputQuantization(activation_scheme(4, "int"))
    with pytest.raises(QuantkitError, match="unknown activation observer"):
        InputQuantization.from_record({**old, "bits": 8, "static": {"granularity": "tensor", "observer": "median"}})


def test_fp8_weight_checkpoint_is_refused_by_gptq_layout(tmp_path: Path):
    with pytest.raises(QuantkitError, match="the gptq layout cannot hold fp8 layers|holds only integer-grid"):
        api.plan_run("rtn", FP8, layout="gptq")


# --- KV cache ---------------------------------------------------------------------------------------------------------


KV_CASES = [("native", KVCacheQuantization("int", "head")), ("native", KVCacheQuantization("fp8", "tensor")),
            ("compressed-tensors", KVCacheQuantization("fp8", "tensor"))]


@pytest.mark.parametrize(("layout", "kv"), KV_CASES, ids=[f"{c[0]}-{c[1].format}-{c[1].granularity}" for c in KV_CASES])
def test_kv_cache_scales_round_trip_and_serve_generation(tiny_model_dir, calib_file, tmp_path, layout, kv):
    out = tmp_path / "kv"
    act = INT8 if layout == "compressed-tensors" else None
    result = api.quantize(str(tiny_model_dir), method="rtn", scheme=W8, output=out, layout=layout, kv_cache=kv,
                          act_scheme=act, calibration=api.CalibrationSpec(str(calib_file), 4, 32))
    model = result.model
    with torch.no_grad():
        expected = model(input_ids=_tokens()).logits
    attention = model.model.layers[0].self_attn
    kv_heads = model.config.num_key_value_heads
    assert attention.k_scale.shape == ((kv_heads,) if kv.granularity == "head" else (1,))
    stored = load_file(out / "model.safetensors")
    assert stored["model.layers.1.self_attn.v_scale"].dtype == torch.float32
    loaded = api.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_tokens()).logits, expected, rtol=0, atol=1e-5)
        # the cached path (one token at a time) reads the same rounded keys and values as the full forward
        prompt = _tokens()[:1, :12]
        generated = loaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False)
        full = loaded(input_ids=generated[:, :-1]).logits[0, -4:].argmax(-1)
        assert torch.equal(full, generated[0, -4:])
    # the scale maps the largest |key| the calibration windows give (recomputed here) onto the grid's extreme
    from quantkit.calib import load_calibration
    from quantkit.kvcache import _wrap

    peaks = []

    def record(module, key, value):
        if module is attention:
            peaks.append(key.abs().amax(dim=(0, 2, 3)))
        return key, value

    windows = load_calibration(str(calib_file), result.tokenizer, 4, 32, 0, model=model)
    model.set_attn_implementation(_wrap("sdpa", record))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    peak = torch.stack(peaks).amax(0)
    peak = peak if kv.granularity == "head" else peak.amax().reshape(1)
    torch.testing.assert_close(attention.k_scale, peak / (448.0 if kv.format == "fp8" else 127.0))


def test_kv_cache_quantization_changes_attention_and_refusals(tiny_model_dir, calib_file, tmp_path):
    calibration = api.CalibrationSpec(str(calib_file), 4, 32)
    plain = api.quantize(str(tiny_model_dir), method="rtn", scheme=W8, calibration=calibration)
    quantized = api.quantize(str(tiny_model_dir), method="rtn", scheme=W8, calibration=calibration,
                             kv_cache=KVCacheQuantization("int", "tensor"))
    with torch.no_grad():
        assert not torch.allclose(plain.model(input_ids=_tokens()).logits,
                                  quantized.model(input_ids=_tokens()).logits, atol=1e-5)
    with pytest.raises(QuantkitError, match="the gptq layout cannot record KV-cache quantization"):
        api.plan_run("rtn", W8, layout="gptq", kv_cache=KVCacheQuantization())
    with pytest.raises(QuantkitError, match="one KV-cache scale per layer"):
        api.plan_run("rtn", W8, layout="compressed-tensors", kv_cache=KVCacheQuantization("fp8", "head"))
    with pytest.raises(QuantkitError, match="unknown KV-cache format 'int4'"):
        KVCacheQuantization("int4")
    bad = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--kv-granularity", "head", "-o",
                  str(tmp_path / "bad"))
    assert_one_line_error(bad, "--kv-granularity needs --kv-format")


@pytest.mark.parametrize(("method", "scheme", "layout", "transform"), [
    ("spqr", QuantScheme(3, 16, False), "native", "awq"),
    ("rtn", QuantScheme.for_format("nvfp4", 4, None, None, 16, True), "compressed-tensors", "awq"),
    ("gptq", QuantScheme(4, 16, True), "gptq", "awq"),
    ("gptq", QuantScheme(4, 16, True), "native", "hadamard+awq"),
], ids=["spqr", "rtn-nvfp4", "gptq-gptq-layout", "gptq-hadamard+awq"])
def test_awq_composes_with_every_method_format_and_layout(tiny_model_dir, calib_file, tmp_path, method, scheme, layout,
                                                         transform):
    out = tmp_path / "awq"
    result = _quantize(tiny_model_dir, calib_file, out, scheme, None, None, layout, method, transform)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert layout != "native" or qc["transform"]["name"] == transform
    with torch.no_grad():
        torch.testing.assert_close(api.load(out)(input_ids=_tokens()).logits,
                                   result.model(input_ids=_tokens()).logits, rtol=0, atol=1e-5)


def test_transformers_from_pretrained_serves_static_scales_and_kv_cache(tiny_model_dir, calib_file, tmp_path):
    from transformers import AutoModelForCausalLM

    import quantkit  # noqa: F401  (registers the quantizer with transformers)

    out = tmp_path / "hf"
    result = api.quantize(str(tiny_model_dir), method="rtn", scheme=W8, output=out, act_scheme=INT8,
                          act_static=StaticActivations(), kv_cache=KVCacheQuantization("fp8", "head"),
                          calibration=api.CalibrationSpec(str(calib_file), 4, 32))
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(out)(input_ids=_tokens()).logits,
                                   result.model(input_ids=_tokens()).logits, rtol=0, atol=1e-5)
