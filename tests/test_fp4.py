"""FP4 number formats: E2M1 rounding, block-scale encodings, RTN/GPTQ on the FP4 grids, activation fake
quantization, the packed layout and its round trips through native and compressed-tensors checkpoints.

References are independent of the code under test: ml_dtypes' float4_e2m1fn / float8 casts, brute-force
nearest-value searches in float64, and compressed-tensors' own decompressors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, run_cli
from test_export_formats import CALIB, _config, quantize_tiny

import quantkit
from helpers_tokenizer import tiny_tokenizer
from quantkit.actquant import InputQuantization, activation_scheme, attach_input_quantizers, fake_quantize
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.errors import QuantkitError
from quantkit.export.save import save_checkpoint
from quantkit.formats.base import TensorPlan
from quantkit.formats.e2m1 import SCALE_CODECS, e2m1_decode, e2m1_encode, global_scale
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.grid import make_grid
from quantkit.formats.packing import pack_nibbles, unpack_nibbles
from quantkit.layouts import get_layout
from quantkit.quantizers import LayerStats, make_quantizer
from quantkit.schemes import QuantScheme

ml_dtypes = pytest.importorskip("ml_dtypes")

MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
NVFP4, MXFP4, FP4 = QuantScheme(4, 16, True, "nvfp4"), QuantScheme(4, 32, True, "mxfp4"), QuantScheme(4, 32, True, "fp4")
FLOAT_SCHEMES = [NVFP4, MXFP4, FP4, QuantScheme(4, -1, True, "fp4")]
SCHEME_IDS = ["nvfp4", "mxfp4", "fp4-g32", "fp4-per-channel"]


def reference_e2m1(x: np.ndarray) -> np.ndarray:
    """float64 values: the nearest of ±MAGNITUDES (ties to the even mantissa, i.e. the even index), saturated."""
    grid = np.array(MAGNITUDES)
    out = np.empty_like(x, dtype=np.float64)
    for i, v in enumerate(x.astype(np.float64)):
        distance = np.abs(grid - min(abs(v), 6.0))
        best = np.flatnonzero(distance == distance.min())
        index = best[0] if len(best) == 1 else next(b for b in best if b % 2 == 0)
        out[i] = math.copysign(grid[index], v)
    return out


# ---------------------------------------------------------------- the E2M1 element

def test_every_e2m1_code_decodes_to_its_value_and_encodes_back() -> None:
    codes = torch.arange(16, dtype=torch.uint8)
    values = e2m1_decode(codes)
    reference = np.array(MAGNITUDES + [-m for m in MAGNITUDES])
    assert values.tolist() == reference.tolist()
    assert torch.equal(e2m1_encode(values), codes)  # -0.0 keeps its sign bit: code 8


def test_every_tie_and_neighbourhood_rounds_as_the_spec_says() -> None:
    """Each midpoint, one float32 step either side of it, the values themselves and saturation, both signs."""
    points = []
    grid = MAGNITUDES + [6.5, 7.0, 8.0, 100.0, 1e30]
    for a, b in zip(grid, grid[1:]):
        mid = np.float32((a + b) / 2)
        points += [a, mid, np.nextafter(mid, np.float32(-1)), np.nextafter(mid, np.float32(100))]
    x = np.array(points + [-p for p in points], dtype=np.float32)
    ours = e2m1_decode(e2m1_encode(torch.from_numpy(x))).numpy()
    assert np.array_equal(ours, x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert np.array_equal(ours, reference_e2m1(x).astype(np.float32))
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    for tie, expected in ties.items():
        assert e2m1_decode(e2m1_encode(torch.tensor([tie, -tie]))).tolist() == [expected, -expected]


def test_e2m1_rounding_matches_ml_dtypes_on_random_values() -> None:
    x = (torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 3).numpy()
    ours = e2m1_decode(e2m1_encode(torch.from_numpy(x))).numpy()
    assert np.array_equal(ours, x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


@pytest.mark.parametrize("n", [1, 2, 7, 32, 33])
def test_nibble_packing_round_trips_with_the_even_column_low(n: int) -> None:
    codes = torch.randint(0, 16, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_nibbles(codes)
    assert packed.shape == (3, -(-n // 2)) and packed.dtype == torch.uint8
    assert torch.equal(packed[:, 0] & 15, codes[:, 0])
    if n > 1:
        assert torch.equal(packed[:, 0] >> 4, codes[:, 1])
    assert torch.equal(unpack_nibbles(packed, n), codes)


# ---------------------------------------------------------------- scale encodings

def test_e4m3_scales_round_trip_every_positive_encoding() -> None:
    codec = SCALE_CODECS["nvfp4"]
    stored = torch.tensor([b for b in range(1, 127)], dtype=torch.uint8).view(torch.float8_e4m3fn)  # all positive finite
    scales = codec.decode(stored)
    again = codec.encode(scales * 6)  # the block maximum that gives exactly this scale
    assert torch.equal(again.view(torch.uint8), stored.view(torch.uint8))
    reference = np.arange(1, 127, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    assert np.array_equal(scales.numpy(), reference)
    # saturation at 448 and no zero scale for an all-zero block
    assert codec.decode(codec.encode(torch.tensor([1e6, 0.0]))).tolist() == [448.0, 2.0**-9]


def test_e8m0_scales_round_trip_every_exponent_and_follow_the_documented_rule() -> None:
    codec = SCALE_CODECS["mxfp4"]
    exponents = torch.arange(-127, 128)
    stored = (exponents + 127).to(torch.uint8)
    scales = codec.decode(stored)
    assert torch.equal(scales.double(), torch.pow(2.0, exponents.double()))
    reference = np.arange(0, 255, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    assert np.array_equal(scales.double().numpy(), reference)
    inside = exponents[(exponents > -125) & (exponents < 125)]  # block maxima that stay finite in float32
    for factor in (3.5, 5.0, 6.0, 6.99):
        assert torch.equal(codec.encode(torch.ldexp(torch.full(inside.shape, factor), inside)), (inside + 127).to(torch.uint8))
    assert torch.equal(codec.encode(torch.ldexp(torch.full(inside.shape, 7.0), inside)), (inside + 128).to(torch.uint8))
    amax = torch.rand(5000, generator=torch.Generator().manual_seed(1)).double() * 2.0 ** torch.randint(-60, 60, (5000,))
    ratio = amax / codec.decode(codec.encode(amax.float())).double()
    assert bool(((ratio >= 3.5) & (ratio < 7)).all())
    assert codec.encode(torch.tensor([0.0])).item() == 0  # an all-zero block takes the smallest scale


def test_stored_scales_that_are_not_scales_are_refused() -> None:
    for fmt, bad in (("mxfp4", torch.tensor([[255]], dtype=torch.uint8)),
                     ("nvfp4", torch.tensor([[0x7F]], dtype=torch.uint8).view(torch.float8_e4m3fn)),
                     ("nvfp4", torch.tensor([[0.0]]).to(torch.float8_e4m3fn)),
                     ("fp4", torch.tensor([[-1.0]], dtype=torch.float16))):
        with pytest.raises(QuantkitError, match="invalid"):
            SCALE_CODECS[fmt].check(bad, "weight_scale")


def test_nvfp4_global_scale_puts_the_largest_block_at_the_top_of_e4m3() -> None:
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2)) * 1e-3
    grid = make_grid(NVFP4, w)
    assert grid.global_scale.item() == np.float32(448 * 6 / w.abs().max().double().item())
    stored, _ = grid.fit(w.reshape(16, 4, 16))
    assert stored.float().max().item() == 448.0  # without it, scales of 1e-3/6 would sit in E4M3's subnormals
    assert global_scale(torch.tensor(0.0)).item() == 1.0


# ---------------------------------------------------------------- round to nearest on the FP4 grids

def reference_rtn(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """float64 RTN from the format notes: block maximum -> scale in the format's encoding -> nearest E2M1."""
    rows, cols = w.shape
    block = cols if scheme.group_size == -1 else scheme.group_size
    w64 = w.double()
    gs = 448 * 6 / w64.abs().max().item() if scheme.format == "nvfp4" else None
    out = torch.empty_like(w64)
    for start in range(0, cols, block):
        part = w64[:, start:start + block]
        amax = part.abs().amax(dim=1)
        if scheme.format == "mxfp4":
            exponent = torch.floor(torch.log2(amax)) - 2
            exponent = exponent + (amax / torch.exp2(exponent) >= 7).double()
            scale = torch.exp2(exponent)
        elif scheme.format == "nvfp4":
            raw = np.clip((amax.float() * np.float32(gs) / 6).numpy(), 2.0**-9, 448).astype(np.float32)
            scale = torch.from_numpy(raw.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)) / np.float32(gs)
        else:
            scale = torch.from_numpy((amax.float() / 6).numpy().astype(np.float16).astype(np.float64))
        values = reference_e2m1((part / scale[:, None]).float().numpy().ravel()).reshape(part.shape)
        out[:, start:start + block] = torch.from_numpy(values) * scale[:, None]
    return out


@pytest.mark.parametrize("cols", [96, 40])  # 40: a partial last block for every format
@pytest.mark.parametrize("scheme", FLOAT_SCHEMES, ids=SCHEME_IDS)
def test_rtn_matches_an_independent_float64_reference(scheme: QuantScheme, cols: int) -> None:
    w = torch.randn(12, cols, generator=torch.Generator().manual_seed(cols)) * 0.05
    qt = make_quantizer("rtn").quantize(w, LayerStats(), scheme)
    assert isinstance(qt, FloatQuantizedTensor) and qt.shape == (12, cols)
    torch.testing.assert_close(qt.dequantize().double(), reference_rtn(w, scheme), rtol=1e-6, atol=0)


@pytest.mark.parametrize("scheme", FLOAT_SCHEMES[:3], ids=SCHEME_IDS[:3])
def test_scale_search_never_loses_to_the_plain_block_maximum(scheme: QuantScheme) -> None:
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) ** 3  # heavy tails
    plain = make_quantizer("rtn").quantize(w, LayerStats(), scheme).dequantize()
    searched = make_quantizer("rtn", mse=True).quantize(w, LayerStats(), scheme).dequantize()
    block = scheme.group_size
    err = lambda q: ((q - w) ** 2).reshape(64, -1, block).sum(dim=-1)  # noqa: E731
    assert bool((err(searched) <= err(plain) * (1 + 1e-6)).all())
    assert err(searched).sum() < err(plain).sum()


# ---------------------------------------------------------------- GPTQ on the FP4 grids

def correlated_problem(out: int = 48, n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    w = torch.randn(out, n, generator=g) * 0.05
    return w, x, LayerStats(hessian=(2 / x.shape[0]) * x.double().t() @ x.double(), tokens=x.shape[0])


@pytest.mark.parametrize("options", [{"static_groups": False}, {"act_order": True}, {"act_order": False}],
                         ids=["group-aware", "static-groups", "natural"])
@pytest.mark.parametrize("scheme", FLOAT_SCHEMES[:3], ids=SCHEME_IDS[:3])
def test_gptq_rounds_onto_the_fp4_grid_and_beats_rtn_on_the_output(scheme: QuantScheme, options: dict) -> None:
    w, x, stats = correlated_problem()
    gptq = make_quantizer("gptq", **options).quantize(w, stats, scheme)
    rtn = make_quantizer("rtn").quantize(w, LayerStats(), scheme)
    assert isinstance(gptq, FloatQuantizedTensor)
    if options.get("act_order"):  # static groups: the block scales are fitted before any update, i.e. RTN's
        assert torch.equal(gptq.scales.view(torch.uint8) if scheme.format == "nvfp4" else gptq.scales,
                           rtn.scales.view(torch.uint8) if scheme.format == "nvfp4" else rtn.scales)
        assert not torch.equal(gptq.codes, rtn.codes)
    output_error = lambda q: float(((x @ (q.dequantize() - w).t()) ** 2).sum())  # noqa: E731
    assert output_error(gptq) < 0.8 * output_error(rtn)


def test_gptq_with_act_order_keeps_float_blocks_contiguous() -> None:
    quantizer = make_quantizer("gptq", act_order=True)  # a static order: groups stay contiguous
    assert not quantizer.column_groups(NVFP4) and not quantizer.column_groups(QuantScheme(4, 16, True))
    assert make_quantizer("gptq", g_idx=True).column_groups(QuantScheme(4, 16, True))
    with pytest.raises(QuantkitError, match="drop --g-idx"):
        make_quantizer("gptq", g_idx=True).check_scheme(NVFP4)
    with pytest.raises(QuantkitError, match="integer grids only"):
        make_quantizer("spqr").check_scheme(NVFP4)


# ---------------------------------------------------------------- activations

def test_per_token_activation_quantization_matches_references() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(5))
    int8 = fake_quantize(x, activation_scheme(8, "int"))
    rows = x.reshape(-1, 64)
    scale = (2 * rows.abs().amax(dim=1, keepdim=True) / 255).half().float()  # GPTQ's symmetric grid, zero 128
    reference = (torch.clamp(torch.round(rows / scale) + 128, 0, 255) - 128) * scale
    torch.testing.assert_close(int8.reshape(-1, 64), reference, rtol=0, atol=0)
    nv = fake_quantize(x, activation_scheme(4, "nvfp4"))
    for row, quantized in zip(rows, nv.reshape(-1, 64)):
        torch.testing.assert_close(quantized.double(), reference_rtn(row[None], NVFP4)[0], rtol=1e-6, atol=0)
    changed = x.clone()
    changed[0, 0] *= 100  # tokens are independent: one token's outlier leaves the others' scales alone
    assert torch.equal(fake_quantize(changed, activation_scheme(4, "nvfp4"))[1:], nv[1:])


def test_activation_schemes_validate() -> None:
    assert activation_scheme(4, "mxfp4").group_size == 32 and activation_scheme(4, "int").group_size == -1
    with pytest.raises(QuantkitError, match="activation bits"):
        activation_scheme(3, "int")
    with pytest.raises(QuantkitError, match="4-bit"):
        activation_scheme(8, "nvfp4")


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("method,scheme", [("rtn", NVFP4), ("gptq", NVFP4), ("gptq", MXFP4), ("rtn", FP4)],
                         ids=["rtn-nvfp4", "gptq-nvfp4", "gptq-mxfp4", "rtn-fp4"])
def test_native_checkpoint_loads_to_the_fake_quant_logits(tmp_path: Path, method: str, scheme: QuantScheme) -> None:
    model, quantized = quantize_tiny(method, scheme)
    save_checkpoint("native", tmp_path / "ckpt", model, tiny_tokenizer(), quantized, _config(method, {}))
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    packed = tensors["model.layers.0.mlp.down_proj.weight_packed"]
    assert packed.dtype == torch.uint8 and packed.shape == (64, 80)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == SCALE_CODECS[scheme.format].dtype
    assert ("model.layers.0.mlp.down_proj.weight_global_scale" in tensors) == (scheme.format == "nvfp4")
    with torch.no_grad():
        expected = model(CALIB).logits
        for kernel in ("dequant", "cpu"):
            loaded = quantkit.load(tmp_path / "ckpt", kernel=kernel)
            torch.testing.assert_close(loaded(CALIB).logits, expected, rtol=0, atol=1e-5)
    for name, qt in quantized.items():
        assert torch.equal(loaded.get_submodule(name).quantized().dequantize(), qt.dequantize())
    weights = sum(qt.shape[0] * qt.shape[1] for qt in quantized.values())
    # casting the model keeps the stored encodings (float8 scales, the float32 tensor scale) exactly
    loaded.to(torch.bfloat16)
    layer = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.weight_scale.dtype == SCALE_CODECS[scheme.format].dtype and layer.weight_packed.dtype == torch.uint8
    assert torch.equal(layer.quantized().dequantize(), quantized["model.layers.0.mlp.down_proj"].dequantize())
    bits = 4 + {"nvfp4": 8 / 16, "mxfp4": 8 / 32, "fp4": 16 / 32}[scheme.format]
    bits += 32 * len(quantized) / weights if scheme.format == "nvfp4" else 0  # one float32 tensor scale a layer
    assert inspect_checkpoint(tmp_path / "ckpt").bits_per_weight == pytest.approx(bits, rel=1e-12)


def test_w4a4_checkpoint_keeps_its_activation_quantization(tmp_path: Path) -> None:
    model, quantized = quantize_tiny("rtn", NVFP4)
    with torch.no_grad():
        weight_only = model(CALIB).logits
    act = activation_scheme(4, "nvfp4")
    attach_input_quantizers(model, quantized, act)
    save_checkpoint("native", tmp_path / "w4a4", model, tiny_tokenizer(), quantized,
                    {**_config("rtn", {}), "input_activations": act.to_dict()})
    loaded = quantkit.load(tmp_path / "w4a4")
    with torch.no_grad():
        fake = model(CALIB).logits
        assert not torch.allclose(fake, weight_only, atol=1e-3)  # the activations really are quantized
        torch.testing.assert_close(loaded(CALIB).logits, fake, rtol=0, atol=1e-5)
    for layout in ("gptq", "compressed-tensors"):
        with pytest.raises(QuantkitError, match="activation"):
            get_layout(layout).check(activations=InputQuantization(act))  # NVFP4 activations: native only


@pytest.mark.parametrize("scheme", [NVFP4, MXFP4], ids=["nvfp4", "mxfp4"])
def test_compressed_tensors_fp4_checkpoint_is_read_by_compressed_tensors(tmp_path: Path, scheme: QuantScheme) -> None:
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationScheme

    model, quantized = quantize_tiny("gptq", scheme)
    save_checkpoint("compressed-tensors", tmp_path / "ct", model, tiny_tokenizer(), quantized, _config("gptq", {}))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    layout = f"{scheme.format}-pack-quantized"
    assert qc["format"] == layout and qc["config_groups"]["group_0"]["format"] == layout
    ct_scheme = QuantizationScheme(**{k: qc["config_groups"]["group_0"][k] for k in ("targets", "weights")})
    compressor = NVFP4PackedCompressor if scheme.format == "nvfp4" else MXFP4PackedCompressor
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, qt in quantized.items():
        state = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        values = unpack_fp4_from_uint8(state["weight_packed"], *qt.shape, dtype=torch.float32)
        assert torch.equal(values, e2m1_decode(qt.codes))
        # compressed-tensors decodes in bfloat16: equal up to that rounding (exact for MXFP4's powers of two)
        dense = compressor.decompress(state, ct_scheme)["weight"]
        tolerance = 0 if scheme.format == "mxfp4" else 2**-8
        torch.testing.assert_close(dense.float(), qt.dequantize(), rtol=tolerance, atol=0)
    loaded = quantkit.load(tmp_path / "ct")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-5)


def test_layouts_refuse_what_they_cannot_hold() -> None:
    with pytest.raises(QuantkitError, match="cannot hold e2m1"):
        get_layout("gptq").check(kinds=["e2m1"])
    with pytest.raises(QuantkitError, match="no layout for fp4"):
        get_layout("compressed-tensors").check(TensorPlan("e2m1", FP4))


def test_corrupt_fp4_checkpoints_fail_with_one_line(tmp_path: Path) -> None:
    model, quantized = quantize_tiny("rtn", NVFP4)
    save_checkpoint("native", tmp_path / "ok", model, tiny_tokenizer(), quantized, _config("rtn", {}))
    tensors = load_file(str(tmp_path / "ok" / "model.safetensors"))
    name = "model.layers.1.self_attn.q_proj"
    edits = {
        "nan-scale": (f"{name}.weight_scale", lambda t: t.view(torch.uint8).index_fill(1, torch.tensor([0]), 0x7F).view(torch.float8_e4m3fn)),
        "zero-global": (f"{name}.weight_global_scale", lambda t: torch.zeros_like(t)),
        "short-codes": (f"{name}.weight_packed", lambda t: t[:, :-1].contiguous()),
    }
    for label, (key, edit) in edits.items():
        folder = tmp_path / label
        folder.mkdir()
        for f in (tmp_path / "ok").iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        save_file({**tensors, key: edit(tensors[key])}, str(folder / "model.safetensors"))
        with pytest.raises(QuantkitError) as info:
            quantkit.load(folder)
        message = str(info.value)
        assert "\n" not in message and key.rpartition(".")[2] in message and name in message, message


# ---------------------------------------------------------------- the command line

def test_cli_quantizes_fp4_with_activations_and_refuses_bad_combinations(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "w4a4"
    proc = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--format", "nvfp4", "--act-bits", "4", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scheme"]["format"] == "nvfp4" and qc["input_activations"]["format"] == "nvfp4"
    assert "nvfp4 g16 + a4 nvfp4 g16" in proc.stdout  # the scheme names the activations
    assert_one_line_error(run_cli("export", str(out), "-o", str(tmp_path / "ct-refused"), "--layout", "compressed-tensors"),
                          "activation")
    w4a8 = tmp_path / "w4a8"
    assert run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--format", "nvfp4", "--act-bits", "8", "-o", str(w4a8)).returncode == 0
    acts = json.loads((w4a8 / "config.json").read_text())["quantization_config"]["input_activations"]
    assert acts == {"bits": 8, "group_size": -1, "symmetric": True, "format": "int", "static": None}  # FP4 has no 8-bit variant
    weight_only = tmp_path / "w4a16"
    assert run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--format", "mxfp4", "-o", str(weight_only)).returncode == 0
    proc = run_cli("export", str(weight_only), "-o", str(tmp_path / "ct"), "--layout", "compressed-tensors")
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        torch.testing.assert_close(quantkit.load(tmp_path / "ct")(CALIB).logits, quantkit.load(weight_only)(CALIB).logits,
                                   rtol=0, atol=0)
    refusals = [
        (["--format", "nvfp4", "--bits", "3"], "4-bit"),
        (["--format", "nvfp4", "--group-size", "32"], "blocks of 16"),
        (["--format", "mxfp4", "--asym"], "symmetric"),
        (["--format", "gptq"], "--layout"),
        (["--format", "nvfp4", "--layout", "gptq"], "gptq layout"),
        (["--format", "fp4", "--layout", "compressed-tensors"], "no layout for fp4"),
        (["--format", "nvfp4", "--act-bits", "4", "--layout", "compressed-tensors"], "activation"),
        (["--act-format", "int"], "--act-bits"),
        (["--method", "spqr", "--format", "nvfp4"], "integer grids"),
    ]
    for flags, message in refusals:
        target = tmp_path / "refused"
        assert_one_line_error(run_cli("quantize", str(tiny_model_dir), "--method", "rtn", *flags, "-o", str(target)), message)
        assert not target.exists()
