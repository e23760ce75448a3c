"""SpQR: bilevel statistics, leave-one-out outlier detection, the CSR format, serving and checkpoints."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import quantkit
from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.engine import quantize_model
from quantkit.errors import QuantkitError
from quantkit.export.save import save_checkpoint
from quantkit.formats.spqr import CsrOutliers, SpQRQuantizedTensor, first_level_grid, quantize_stats
from quantkit.models.architectures import adapter_for
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.spqr import leave_one_out_gain
from quantkit.runtime.quant_linear import QuantLinear, set_backend
from quantkit.schemes import QuantScheme

CALIB = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(3))


def layer_problem(out: int = 48, n: int = 96, seed: int = 0, tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor, LayerStats]:
    """A weight with a few planted outliers, inputs with uneven channel scales, and their Hessian."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=gen) * torch.linspace(0.2, 3.0, n)
    w = torch.randn(out, n, generator=gen) * 0.05
    w[3, 7], w[10, 50], w[out - 5, n - 4] = 1.0, -0.8, 0.9
    return w, x, LayerStats(hessian=2 * x.double().T @ x.double() / tokens, tokens=tokens)


def output_error(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor) -> float:
    ref = x.double() @ w.double().T
    return float(((x.double() @ q.double().T - ref) ** 2).mean() / (ref**2).mean())


# ---------------------------------------------------------------- statistics and grids

def test_quantized_statistics_reproduce_values_within_half_a_step() -> None:
    values = torch.rand(3, 40, generator=torch.Generator().manual_seed(1)) * 0.1 + 0.01
    values[1, 16:32] = 0.05  # one flat block of rows
    stats = quantize_stats(values, bits=3, block=16)
    assert stats.codes.shape == (3, 40) and stats.scale.shape == (3, 3) and stats.scale.dtype == torch.float16
    assert int(stats.codes.max()) <= 7
    decoded = stats.dequantize(16)
    step = stats.scale.float().repeat_interleave(16, dim=1)[:, :40]
    assert bool(((decoded - values).abs() <= step / 2 + 1e-4).all())
    assert torch.allclose(decoded[1, 16:32], values[1, 16:32], rtol=1e-3)


def test_leave_one_out_gain_matches_refitting_each_grid_by_hand() -> None:
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(6, 16, generator=gen)
    w[1, 3] = w[1, 4] = w[1].min() - 1  # a tied minimum
    w[2] = 0.3  # a constant row
    d = torch.rand(16, generator=gen) + 0.5
    gains = leave_one_out_gain(w, d, bits=3, symmetric=False)

    def error(values: torch.Tensor, weights: torch.Tensor) -> float:
        s, z = first_level_grid(values.min(), values.max(), 3, False)
        q = s * (torch.clamp(torch.round(values / s + z), 0, 7) - z)
        return float((((q - values) / weights) ** 2).sum())

    for r in range(6):
        base = error(w[r], d)
        for i in range(16):
            keep = torch.arange(16) != i
            assert gains[r, i].item() == pytest.approx(base - error(w[r, keep], d[keep]), abs=1e-5)


# ---------------------------------------------------------------- the quantizer

@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_spqr_beats_round_to_nearest_and_keeps_planted_outliers(symmetric: bool, act_order: bool) -> None:
    w, x, stats = layer_problem()
    scheme = QuantScheme(3, 16, symmetric)
    qt = make_quantizer("spqr", act_order=act_order, outlier_threshold=0.2).quantize(w, stats, scheme)
    rtn = make_quantizer("rtn").quantize(w, LayerStats(), scheme).dequantize()
    q = qt.dequantize()
    assert output_error(w, q, x) < 0.8 * output_error(w, rtn, x)
    rows, cols = qt.outliers.rows(), qt.outliers.columns
    positions = set(zip(rows.tolist(), cols.tolist()))
    assert {(3, 7), (10, 50), (43, 92)} <= positions
    assert torch.equal(q[rows, cols], qt.outliers.values.float())  # kept at their float16 value
    assert torch.equal(q[3, 7], torch.tensor(1.0))
    assert (qt.perm is not None) == act_order


def test_no_outliers_with_an_infinite_threshold_and_fewer_with_a_higher_one() -> None:
    w, _, stats = layer_problem()
    scheme = QuantScheme(3, 16, False)
    counts = [make_quantizer("spqr", outlier_threshold=t).quantize(w, stats, scheme).outliers.count
              for t in (0.1, 0.3, 1.0, float("inf"))]
    assert counts[0] >= counts[1] >= counts[2] >= counts[3] == 0
    assert counts[0] > counts[2]


def test_simplified_outliers_skip_the_leave_one_out_fit() -> None:
    w, x, stats = layer_problem()
    scheme = QuantScheme(3, 16, False)
    loo = make_quantizer("spqr").quantize(w, stats, scheme)
    simple = make_quantizer("spqr", simplified_outliers=True).quantize(w, stats, scheme)
    assert not torch.equal(loo.scale_stats.codes, simple.scale_stats.codes)
    rtn = make_quantizer("rtn").quantize(w, LayerStats(), scheme).dequantize()
    assert output_error(w, simple.dequantize(), x) < output_error(w, rtn, x)


def test_nonsense_settings_are_refused() -> None:
    with pytest.raises(QuantkitError, match="outlier threshold must be positive"):
        make_quantizer("spqr", outlier_threshold=-1)
    with pytest.raises(QuantkitError, match="outlier threshold must be positive"):
        make_quantizer("spqr", outlier_threshold=float("nan"))
    with pytest.raises(QuantkitError, match="statistic bits"):
        make_quantizer("spqr", stat_bits=0)
    with pytest.raises(QuantkitError, match="statistic group size"):
        make_quantizer("spqr", stat_group_size=0)
    w, _, stats = layer_problem()
    with pytest.raises(QuantkitError, match="group size 1 makes no sense"):
        make_quantizer("spqr").quantize(w, stats, QuantScheme(3, 1, False))
    with pytest.raises(QuantkitError, match="has no option --outlier-threshold"):
        make_quantizer("gptq", outlier_threshold=0.2)


# ---------------------------------------------------------------- CSR and the packed format

def test_csr_round_trip_and_validation() -> None:
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(7, 30, generator=gen) < 0.15
    mask[2] = False  # an empty row
    weight = torch.randn(7, 30, generator=gen)
    csr = CsrOutliers.from_mask(mask, weight)
    csr.validate((7, 30))
    dense = torch.zeros(7, 30)
    dense[csr.rows(), csr.columns] = csr.values.float()
    assert torch.equal(dense, torch.where(mask, weight.half().float(), 0.0))
    assert torch.equal(csr.row_offsets.long().diff(), mask.sum(1))
    with pytest.raises(QuantkitError, match="row offsets"):
        CsrOutliers(csr.row_offsets.flip(0), csr.columns, csr.values).validate((7, 30))
    with pytest.raises(QuantkitError, match="column index outside"):
        CsrOutliers(csr.row_offsets, csr.columns + 30, csr.values).validate((7, 30))
    if csr.count > 1:
        swapped = csr.columns.clone()
        swapped[[0, 1]] = swapped[[1, 0]]
        row_of = csr.rows()
        if row_of[0] == row_of[1]:
            with pytest.raises(QuantkitError, match="strictly increasing"):
                CsrOutliers(csr.row_offsets, swapped, csr.values).validate((7, 30))


@pytest.mark.parametrize("bits,symmetric,group", [(3, False, 16), (2, True, 32), (4, False, -1), (8, True, 24)])
def test_packed_tensors_round_trip(bits: int, symmetric: bool, group: int) -> None:
    w, _, stats = layer_problem(out=40, n=90)  # neither dimension a multiple of 16
    qt = make_quantizer("spqr").quantize(w, stats, QuantScheme(bits, group, symmetric))
    tensors = qt.to_tensors()
    specs = SpQRQuantizedTensor.expected_tensors(qt.meta(), qt.shape)
    assert {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()} == specs
    back = SpQRQuantizedTensor.from_tensors(tensors, qt.meta(), qt.shape)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_corrupt_permutation_is_refused() -> None:
    w, _, stats = layer_problem()
    qt = make_quantizer("spqr", act_order=True).quantize(w, stats, QuantScheme(3, 16, False))
    tensors = qt.to_tensors()
    tensors["perm"] = torch.zeros_like(tensors["perm"])
    with pytest.raises(QuantkitError, match="not a permutation"):
        SpQRQuantizedTensor.from_tensors(tensors, qt.meta(), qt.shape)


# ---------------------------------------------------------------- serving

@pytest.mark.parametrize("bits,symmetric,group,act_order", [
    (3, False, 16, True), (2, True, 16, False), (4, False, 32, True), (8, False, -1, False), (3, True, 24, True),
])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_dense_plus_sparse_layer_equals_the_dequantized_weight(bits: int, symmetric: bool, group: int,
                                                              act_order: bool, rows: int) -> None:
    w, _, stats = layer_problem(out=40, n=90)
    qt = make_quantizer("spqr", act_order=act_order).quantize(w, stats, QuantScheme(bits, group, symmetric))
    assert qt.outliers.count > 0
    layer = QuantLinear(90, 40, False, qt.meta(), torch.float32)
    for name, tensor in qt.to_tensors().items():
        setattr(layer, name, tensor)
    x = torch.randn(rows, 90, generator=torch.Generator().manual_seed(5))
    expected = x.double() @ qt.dequantize(torch.float64).T
    assert layer.kernel_name(x.device, x.dtype) == "cpu"
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits,symmetric,group", [(3, False, 16), (3, True, 16), (4, False, 32), (8, False, 64)])
@pytest.mark.parametrize("rows", [1, 7, 40])
def test_c_kernel_serves_the_dense_part_exactly_and_with_int8_decode(bits: int, symmetric: bool, group: int,
                                                                     rows: int) -> None:
    """Inputs a multiple of 32 wide: the dense part runs through the C kernels (statistics decoded once at load),
    exact in float32, and with int8 activations exactly the product of the block-rounded activations."""
    from test_cpu_kernels import int8_blocks

    w, _, stats = layer_problem(out=40, n=128)
    qt = make_quantizer("spqr", act_order=True).quantize(w, stats, QuantScheme(bits, group, symmetric))
    assert qt.outliers.count > 0
    x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(5))
    weight = qt.dequantize(torch.float64)
    for backend in ("cpu", "cpu-int8"):
        layer = QuantLinear(128, 40, False, qt.meta(), torch.float32, backend=backend)
        for name, tensor in qt.to_tensors().items():
            setattr(layer, name, tensor)
        kernel = layer._kernel(x.device, x.dtype)[1]
        assert kernel.fused is not None, repr(kernel)
        decoded = x.double()
        if backend == "cpu-int8" and rows <= 16:
            # the dense part (codes at every position) sees the rounded activations, the outliers' correction
            # (outlier - dense value) the exact ones
            decoded = int8_blocks(x, kernel.fused.gemv_columns)
            dense = qt.dense_permuted().double()[:, torch.argsort(qt.perm)]
            expected = decoded @ dense.T + x.double() @ (weight - dense).T
        else:
            expected = decoded @ weight.T
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_cpu_kernel_dequantizes_in_slabs_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantkit.runtime import spqr_kernels
    from quantkit_kernels import slabs

    monkeypatch.setattr(slabs, "SLAB_BYTES", 16 * 4 * 90)  # one statistics block of rows per slab
    w, _, stats = layer_problem(out=40, n=90)
    qt = make_quantizer("spqr").quantize(w, stats, QuantScheme(3, 16, False))
    kernel = spqr_kernels.SpQRCpuKernel(qt, None)  # no C build: the slab path
    assert kernel.slab_rows == 16
    x = torch.randn(3, 90, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(kernel(x).double(), x.double() @ qt.dequantize(torch.float64).T, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- checkpoints

def spqr_checkpoint(folder: Path, scheme: QuantScheme, **options) -> tuple[torch.nn.Module, dict]:
    model = tiny_model()
    quantized = quantize_model(model, adapter_for("llama"), make_quantizer("spqr", **options), lambda _: scheme, CALIB)
    save_checkpoint("native", folder, model, tiny_tokenizer(), quantized, {"method": "spqr", "quantizer": options})
    return model, quantized


@pytest.mark.parametrize("scheme,options", [
    (QuantScheme(3, 16, False), {"outlier_threshold": 0.2}),
    (QuantScheme(4, 32, True), {"outlier_threshold": 0.05, "act_order": False, "simplified_outliers": True}),
])
def test_checkpoint_loads_with_the_fake_quant_logits(tmp_path: Path, scheme: QuantScheme, options: dict) -> None:
    fake, quantized = spqr_checkpoint(tmp_path / "ckpt", scheme, **options)
    assert sum(qt.outliers.count for qt in quantized.values()) > 0
    loaded = quantkit.load(tmp_path / "ckpt")
    with torch.no_grad():
        expected = fake(CALIB).logits
        torch.testing.assert_close(loaded(CALIB).logits, expected, rtol=0, atol=1e-4)
        set_backend(loaded, "dequant")
        torch.testing.assert_close(loaded(CALIB).logits, expected, rtol=0, atol=1e-5)
    for name, qt in quantized.items():
        assert torch.equal(loaded.get_submodule(name).quantized().dequantize(), qt.dequantize())


def test_average_bits_match_an_independent_count_of_tensor_bytes(tmp_path: Path) -> None:
    _, quantized = spqr_checkpoint(tmp_path / "ckpt", QuantScheme(3, 16, False), outlier_threshold=0.2)
    info = inspect_checkpoint(tmp_path / "ckpt")
    layer_bytes = 0
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            if name.rsplit(".", 1)[0] in quantized:
                t = f.get_tensor(name)
                layer_bytes += t.numel() * t.element_size()
    weights = sum(math.prod(qt.shape) for qt in quantized.values())
    outliers = sum(qt.outliers.count for qt in quantized.values())
    assert info.quantized_weights == weights and info.total.outliers == outliers
    assert info.bits_per_weight == pytest.approx(8 * layer_bytes / weights, rel=1e-12)
    # SpQR's own formula, plus what it leaves out: CSR row offsets and the 16-bit permutation.
    formula = sum(
        math.prod(qt.shape) * (3 + (3 + 3) / 16 + 2 * (16 + 16) / (16 * 16)) + 32 * qt.outliers.count
        + 32 * (qt.shape[0] + 1) + 16 * qt.shape[1]
        for qt in quantized.values()
    ) / weights
    assert info.bits_per_weight == pytest.approx(formula, rel=1e-12)
    roles = info.total.role_bits()
    assert roles["codes"] == pytest.approx(3.0) and roles["statistics"] == pytest.approx(0.625)
    assert roles["outliers"] == pytest.approx(sum(32 * (qt.outliers.count + qt.shape[0] + 1) for qt in quantized.values()) / weights)


def test_cli_quantize_inspect_and_refusals(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "quantkit", *args], capture_output=True, text=True)

    out = tmp_path / "spqr"
    common = [str(tiny_model_dir), "--method", "spqr", "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32"]
    done = run("quantize", *common, "--bits", "3", "--outlier-threshold", "0.2", "-o", str(out))
    assert done.returncode == 0, done.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["method"] == "spqr" and qc["scheme"] == {"bits": 3, "group_size": 16, "symmetric": False, "format": "int"}
    assert qc["quantizer"]["damp"] == 1.0
    layer = qc["layers"]["model.layers.0.mlp.down_proj"]
    assert layer["kind"] == "spqr" and layer["stat_bits"] == 3 and layer["outliers"] >= 0
    shown = run("inspect", str(out), "--json")
    assert shown.returncode == 0
    total = json.loads(shown.stdout)["total"]
    assert set(total["role_bits"]) >= {"codes", "statistics", "outliers", "permutation"}
    for bad, message in [
        (["--outlier-threshold", "0"], "outlier threshold must be positive"),
        (["--group-size", "1"], "group size 1 makes no sense"),
        (["--layout", "gptq"], "cannot hold spqr layers"),
    ]:
        failed = run("quantize", *common, *bad, "-o", str(tmp_path / "bad"))
        assert failed.returncode != 0 and message in failed.stderr, failed.stderr
        assert not (tmp_path / "bad").exists()
    failed = run("export", str(out), "-o", str(tmp_path / "bad"), "--layout", "compressed-tensors")
    assert failed.returncode != 0 and "cannot hold spqr layers" in failed.stderr, failed.stderr
    assert not (tmp_path / "bad").exists()
