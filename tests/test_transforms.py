"""Transforms: function preservation (float64), training keeps rotations orthogonal, online maps and learned
clipping survive save/load, every quantizer composes with every transform."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from conftest import tiny_llama_config, tiny_model
from quantkit import api
from quantkit.actquant import activation_scheme, fake_quantize
from quantkit.errors import QuantkitError
from quantkit.formats.grid import make_grid, quantize_groups
from quantkit.formats.kron import Kron, decompose_dim, kron_apply
from quantkit.models.architectures import adapter_for
from quantkit.quantizers.base import LayerStats
from quantkit.quantizers.rtn import RTNQuantizer
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme
from quantkit.transforms import make_transform
from quantkit.transforms.base import TransformContext
from quantkit.transforms.hadamard import hadamard_kron, orthonormal_hadamard
from quantkit.transforms.orthogonal import orthogonality_error
from quantkit.transforms.prepare import prepare
from quantkit.transforms.rewrite import attach_online, fuse
from quantkit.transforms.simquant import simulate

ADAPTER = adapter_for("llama")
W4 = QuantScheme(4, -1, True)
A4 = activation_scheme(4, "int")
TINY_BUDGET = {"nsamples": 4, "seqlen": 32, "epochs": 2, "batch_size": 2}


def _randomize_norms(model: torch.nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=generator))


def _model(**config_overrides) -> torch.nn.Module:
    """The tiny random Llama (tied embeddings) with non-trivial norm weights."""
    if config_overrides:
        from transformers import AutoModelForCausalLM

        config = tiny_llama_config()
        for key, value in config_overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        for p in model.parameters():
            p.requires_grad_(False)
    else:
        model = tiny_model()
    _randomize_norms(model)
    return model


def _calibration(vocab: int = 320):
    def windows(count: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (count, length), generator=torch.Generator().manual_seed(count * 1000 + length))

    return windows


def _tokens() -> torch.Tensor:
    return torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(7))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_tokens(), use_cache=False).logits


def _transform(name: str):
    return make_transform(name, **(TINY_BUDGET if name != "hadamard" else {}))


# --- building blocks ---------------------------------------------------------------------------------------------


def test_kron_apply_is_multiplication_by_the_kronecker_product():
    g = torch.Generator().manual_seed(0)
    left, right = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(5, 5, generator=g, dtype=torch.float64)
    x = torch.randn(4, 7, 15, generator=g, dtype=torch.float64)
    torch.testing.assert_close(kron_apply(x, left, right), x @ torch.kron(left, right), rtol=0, atol=1e-12)
    kron = Kron(left, right, torch.linalg.inv(left).T, torch.linalg.inv(right).T)
    w = torch.randn(6, 15, generator=g, dtype=torch.float64)
    # weight T^-T reads x T and gives the same output
    torch.testing.assert_close(kron.apply(x) @ kron.fuse(w).T, x @ w.T, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("n", "factors"), [(576, (24, 24)), (1536, (32, 48)), (4096, (64, 64)), (11008, (86, 128)),
                                            (896, (28, 32)), (4864, (64, 76)), (7, (1, 7))])
def test_decompose_dim_matches_flatquants_sizes(n, factors):
    assert decompose_dim(n) == factors


def test_hadamard_kron_is_orthogonal_and_falls_back_for_other_sizes():
    g = torch.Generator().manual_seed(0)
    kron = hadamard_kron(1536, g)
    assert kron.sizes == (12, 128)
    full = torch.kron(kron.left, kron.right)
    assert orthogonality_error(full) < 1e-12
    assert set(torch.unique((full * math.sqrt(1536)).round()).tolist()) == {-1.0, 1.0}  # a Hadamard matrix
    fallback = hadamard_kron(9 * 7, g)  # no Hadamard of order 63: random orthogonal factors
    assert fallback.sizes == decompose_dim(63)
    assert orthogonality_error(torch.kron(fallback.left, fallback.right)) < 1e-12
    assert orthogonality_error(orthonormal_hadamard(576, g, randomized=True)) < 1e-12


def test_simulated_int_grid_matches_the_grid_convention_and_passes_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 40, generator=g, dtype=torch.float64)
    ratio = torch.full((8,), 0.9, dtype=torch.float64, requires_grad=True)
    out = simulate(x, W4, ratio)
    # known answer: symmetric grid, scale 2·max/15 around code 8, range shrunk by the ratio
    scale = 2 * 0.9 * x.abs().amax(dim=1, keepdim=True) / 15
    expected = (torch.clamp(torch.round(x / scale) + 8, 0, 15) - 8) * scale
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=1e-12)
    out.sum().backward()
    assert ratio.grad is not None and ratio.grad.abs().sum() > 0


def test_learned_clip_shrinks_the_quantizers_range():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 32, generator=g)
    clip = torch.linspace(0.6, 1.0, 6)
    got = RTNQuantizer().quantize(w, LayerStats(clip=clip), W4).dequantize(torch.float32)
    grid = make_grid(W4, w * clip[:, None])  # the range of the clipped weight, then every value rounded on it
    params = grid.fit(w * clip[:, None])
    torch.testing.assert_close(got, grid.round(w, params)[1], rtol=0, atol=0)
    x = torch.randn(5, 32, generator=g)
    clipped = fake_quantize(x, A4, 0.8)
    ref_grid = make_grid(A4, x * 0.8, per_row=True)
    torch.testing.assert_close(clipped, ref_grid.round(x, ref_grid.fit(x * 0.8))[1], rtol=0, atol=0)
    assert not torch.equal(clipped, quantize_groups(make_grid(A4, x, per_row=True), x)[2])


# --- function preservation -----------------------------------------------------------------------------------------


def test_prepare_unties_and_folds_norms_exactly():
    model = _model().double()
    before = _logits(model)
    prepare(model, ADAPTER)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p))
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", ["hadamard", "flatquant", "ostquant"])
@pytest.mark.parametrize("config", [{}, {"intermediate_size": 168, "num_attention_heads": 3, "num_key_value_heads": 1,
                                         "hidden_size": 48}], ids=["hadamard-sizes", "other-sizes"])
def test_transform_preserves_full_precision_logits_in_float64(name, config):
    """Learn in float32, fuse into a float64 copy: the rewritten model computes the same function (to 1e-6:
    transformers' RMSNorm computes in float32 even in a float64 model, and the rotated residual rounds
    differently there)."""
    model = _model(**config)
    reference = copy.deepcopy(model).double()
    expected = _logits(reference)
    prepare(model, ADAPTER)
    learned = _transform(name).learn(TransformContext(model, ADAPTER, W4, A4, _calibration()))
    prepare(reference, ADAPTER)
    online = fuse(reference, ADAPTER, learned.rewrite)
    attach_online(reference, online)
    torch.testing.assert_close(_logits(reference), expected, rtol=0, atol=1e-6)
    assert online, "every transform here leaves online maps"
    weights = torch.cat([p.flatten() for p in reference.parameters()])
    assert torch.isfinite(weights).all()


def test_hadamard_places_quarot_rotations():
    model = _model()
    applied = make_transform("hadamard").apply(TransformContext(model, ADAPTER, W4, None, _calibration()))
    down = {n for n in applied.online if n.endswith("mlp.down_proj")}
    across = {n for n in applied.online if n.endswith("self_attn.o_proj")}
    assert len(down) == 2 and len(across) == 2  # 4 heads have a Hadamard matrix: online across heads
    assert applied.online["model.layers.0.mlp.down_proj"].sizes == (20, 8)  # 160 = 20 · 8
    assert not applied.weight_clip and not applied.act_clip


def test_trained_rotations_stay_orthogonal():
    model = _model()
    prepare(model, ADAPTER)
    ost = make_transform("ostquant", **TINY_BUDGET)
    learned = ost.learn(TransformContext(model, ADAPTER, W4, A4, _calibration()))
    rewrite = learned.rewrite
    initial = orthonormal_hadamard(64, torch.Generator().manual_seed(0), randomized=True).float()
    assert not torch.allclose(rewrite.residual, initial), "training moved the rotation"
    assert orthogonality_error(rewrite.residual) < 1e-5
    for block in rewrite.blocks:
        assert orthogonality_error(block.head_rotation) < 1e-5
    flat = make_transform("flatquant", **TINY_BUDGET).learn(TransformContext(model, ADAPTER, W4, A4, _calibration()))
    for block in flat.rewrite.blocks:  # P = U diag(σ) Vᵀ, P⁻ᵀ = U diag(1/σ) Vᵀ: P (P⁻ᵀ)ᵀ = I needs U, V orthogonal
        for kron in (block.attention_online, block.output_online, block.mlp_online, block.down_online):
            for p, p_it in ((kron.left, kron.left_it), (kron.right, kron.right_it)):
                assert (p.double() @ p_it.double().T - torch.eye(p.shape[0], dtype=torch.float64)).abs().max() < 1e-5
    assert flat.stats["block_mse_last_epoch"] < flat.stats["block_mse_first_epoch"]
    assert set(flat.act_clip) == set(ADAPTER.quantizable_layers(model))
    assert all(0 < r <= 1 for r in flat.act_clip.values())


# --- checkpoints ---------------------------------------------------------------------------------------------------


def _quantize(tiny_model_dir, calib_file, tmp_path, transform: str, method: str, scheme=W4, act=A4, **options):
    out = tmp_path / f"{transform}-{method}"
    result = api.quantize(
        str(tiny_model_dir), method=method, scheme=scheme, output=out, act_scheme=act,
        calibration=api.CalibrationSpec(str(calib_file), 4, 32), transform=_transform(transform), **options,
    )
    return result, out


@pytest.mark.parametrize("transform", ["hadamard", "flatquant", "ostquant"])
@pytest.mark.parametrize(("method", "scheme"), [("rtn", W4), ("gptq", QuantScheme(4, 16, True)),
                                                ("spqr", QuantScheme(3, 16, False)),
                                                ("rtn", QuantScheme.for_format("nvfp4", 4, None, None, 16, True))],
                         ids=["rtn", "gptq", "spqr", "rtn-nvfp4"])
def test_transform_and_quantizer_round_trip_through_the_checkpoint(tiny_model_dir, calib_file, tmp_path, transform,
                                                                  method, scheme):
    act = activation_scheme(4, "nvfp4") if scheme.is_float else A4
    result, out = _quantize(tiny_model_dir, calib_file, tmp_path, transform, method, scheme, act)
    expected = _logits(result.model)
    loaded = api.load(out, kernel="dequant")
    torch.testing.assert_close(_logits(loaded), expected, rtol=0, atol=1e-5)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    record = qc["transform"]
    assert record["name"] == transform and record["online"]
    for layer, sizes in record["online"].items():
        module = loaded.get_submodule(layer)
        assert isinstance(module, QuantLinear) and module.input_transform == tuple(sizes)
        assert torch.equal(module.input_transform_left, result.model.get_submodule(layer).input_transform_left)
    for layer, ratio in record["activation_clip"].items():
        assert loaded.get_submodule(layer).input_clip == ratio


def test_weight_only_transform_serves_through_the_cpu_kernels(tiny_model_dir, calib_file, tmp_path):
    result, out = _quantize(tiny_model_dir, calib_file, tmp_path, "hadamard", "rtn", QuantScheme(4, 32, True), None)
    expected = _logits(result.model)
    for kernel in ("dequant", "cpu"):
        torch.testing.assert_close(_logits(api.load(out, kernel=kernel)), expected, rtol=1e-4, atol=1e-4)
    bf16 = api.load(out, kernel="dequant").to(torch.bfloat16)
    layer = bf16.get_submodule("model.layers.0.mlp.down_proj")
    assert layer.input_transform_left.dtype == torch.float32  # factors keep their precision


def test_layouts_that_cannot_hold_online_maps_are_refused_before_work(tiny_model_dir, calib_file, tmp_path):
    with pytest.raises(QuantkitError, match="online input maps"):
        _quantize(tiny_model_dir, calib_file, tmp_path, "hadamard", "gptq", QuantScheme(4, 16, True), None,
                  layout="gptq")
    assert not any(tmp_path.iterdir())
    _, out = _quantize(tiny_model_dir, calib_file, tmp_path, "hadamard", "rtn", QuantScheme(4, 16, True), None)
    with pytest.raises(QuantkitError, match="online input maps"):
        api.export(out, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda r: r["online"].update({"model.layers.0.mlp.down_proj": [3, 50]}), "do not match"),
    (lambda r: r["online"].update({"model.layers.9.mlp.down_proj": [20, 8]}), "not a quantized layer"),
    (lambda r: r["activation_clip"].update({"model.layers.0.mlp.down_proj": 1.5}), "outside"),
    (lambda r: r.update(online="nonsense"), "corrupt transform record"),
])
def test_corrupt_transform_records_are_refused(tiny_model_dir, calib_file, tmp_path, edit, message):
    _, out = _quantize(tiny_model_dir, calib_file, tmp_path, "hadamard", "rtn")
    config = json.loads((out / "config.json").read_text())
    record = config["quantization_config"]["transform"]
    record["activation_clip"] = {"model.layers.0.mlp.down_proj": 0.9}
    edit(record)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match=message):
        api.load(out)


def test_non_finite_online_factors_are_refused(tiny_model_dir, calib_file, tmp_path):
    from safetensors.torch import load_file, save_file

    _, out = _quantize(tiny_model_dir, calib_file, tmp_path, "hadamard", "rtn")
    path = out / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.input_transform_right"][0, 0] = float("nan")
    save_file(tensors, path)
    with pytest.raises(QuantkitError, match="input_transform_right contains NaN"):
        api.load(out)


@pytest.mark.parametrize(("name", "options", "message"), [
    ("bogus", {}, "unknown transform"),
    ("hadamard", {"epochs": 2}, "not trained"),
    ("flatquant", {"epochs": 0}, "must be positive"),
    ("ostquant", {"budget": "huge"}, "unknown training budget 'huge'"),
    ("ostquant", {"steps": 3}, "unknown training budget field 'steps'"),
])
def test_bad_transform_options_are_refused(name, options, message):
    with pytest.raises(QuantkitError, match=message):
        make_transform(name, **options)


# --- command line ----------------------------------------------------------------------------------------------------


def test_cli_quantize_with_a_trained_transform_and_evaluate(tiny_model_dir, calib_file, tmp_path):
    from test_cli import run_cli

    out = tmp_path / "flat"
    proc = run_cli("quantize", str(tiny_model_dir), "--transform", "flatquant", "--method", "rtn", "--bits", "4",
                   "--group-size", "-1", "--act-bits", "4", "--calib", str(calib_file), "--nsamples", "4",
                   "--seqlen", "32", "--transform-nsamples", "4", "--transform-seqlen", "32", "--transform-epochs", "1",
                   "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "flatquant, 14 online input maps" in proc.stdout  # q/k/v, o, gate/up, down in 2 blocks
    record = json.loads((out / "config.json").read_text())["quantization_config"]["transform"]
    from quantkit.transforms.flatquant import CPU_BUDGET

    assert record["options"]["budget"] == {"nsamples": 4, "seqlen": 32, "epochs": 1, "batch_size": CPU_BUDGET.batch_size}
    proc = run_cli("eval", str(out), "--ppl", str(calib_file), "--seqlen", "32", "--report", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(("args", "fragments"), [
    (["--transform-epochs", "2"], ("need --transform",)),
    (["--transform", "rotate"], ("--transform 'rotate' is not allowed", "hadamard")),
    (["--transform", "hadamard", "--layout", "compressed-tensors"], ("online input maps",)),
])
def test_cli_refuses_bad_transform_options(tiny_model_dir, calib_file, tmp_path, args, fragments):
    from test_cli import assert_one_line_error, run_cli

    out = tmp_path / "out"
    proc = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--calib", str(calib_file), *args, "-o", str(out))
    assert_one_line_error(proc, *fragments)
    assert not out.exists()


def test_shared_online_maps_feed_gptq_with_several_calibration_batches():
    """q/k/v share one online map: with the engine's lockstep batches, each batch still gives the group one
    transformed tensor (and the fake-quant model is the one the checkpoint serves)."""
    from quantkit.engine import EngineOptions, quantize_model
    from quantkit.quantizers.gptq import GPTQQuantizer

    model = _model()
    applied = _transform("flatquant").apply(TransformContext(model, ADAPTER, W4, None, _calibration()))
    attach_online(model, applied.online)
    calib = _calibration()(4, 32)
    scheme = QuantScheme(4, 16, True)
    quantized = quantize_model(model, ADAPTER, GPTQQuantizer(), lambda _n: scheme, calib,
                               EngineOptions(batch_tokens=32, weight_clip=applied.weight_clip))
    assert set(quantized) == set(ADAPTER.quantizable_layers(model))


def test_training_forward_is_the_fused_model_when_nothing_is_quantized():
    """OSTQuant's training forward (rewritten weights + residual hooks) with no quantizer equals the
    full-precision model: the KL-Top loss is zero from the first step."""
    model = _model()
    prepare(model, ADAPTER)
    ost = make_transform("ostquant", **TINY_BUDGET)
    ost.weight_quant = False
    learned = ost.learn(TransformContext(model, ADAPTER, W4, None, _calibration()))
    assert learned.stats["kl_top_first_epoch"] < 1e-6


@pytest.mark.parametrize("name", ["flatquant", "ostquant"])
def test_trained_transforms_refuse_a_model_that_is_not_float32(name):
    model = _model().to(torch.bfloat16)
    with pytest.raises(QuantkitError, match="trains on a float32 model"):
        _transform(name).apply(TransformContext(model, ADAPTER, W4, A4, _calibration()))


def test_spqr_applies_the_learned_weight_clip():
    from quantkit.quantizers.spqr import SpQRQuantizer

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(256, 64, generator=g, dtype=torch.float64)
    stats = LayerStats(hessian=2 * x.T @ x / 256, tokens=256)
    scheme = QuantScheme(4, 16, False)
    spqr = SpQRQuantizer(outlier_threshold=float("inf"))
    plain = spqr.quantize(w, stats, scheme).dequantize(torch.float32)
    clipped = spqr.quantize(w, LayerStats(stats.hessian, 256, torch.full((32,), 0.5)), scheme).dequantize(torch.float32)
    assert (plain.abs().amax(dim=1) > 0.8 * w.abs().amax(dim=1)).all()
    assert (clipped.abs().amax(dim=1) < 0.65 * w.abs().amax(dim=1)).all()
