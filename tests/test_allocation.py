"""Mixed-bit allocation: exact costs, measured scores, strategies within the budget, mixed checkpoints."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_cli

import quantkit
from conftest import tiny_model
from quantkit.allocation.allocate import choose, plan_allocation, ranked_allocation
from quantkit.allocation.costs import LayerCost, budget_bytes
from quantkit.allocation.database import build_database, output_nmse
from quantkit.allocation.kl import KLMeter
from quantkit.allocation.measure import measure
from quantkit.allocation.options import AllocationOptions
from quantkit.allocation.plan import AllocationPlan
from quantkit.allocation.scores import lim_scores, zd_score
from quantkit.allocation.search import BudgetedMoves, SearchBudget, evolve, random_allocation
from quantkit.allocation.units import make_units
from quantkit.api import CalibrationSpec, quantize
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.engine import quantize_model
from quantkit.errors import QuantkitError
from quantkit.models.architectures import adapter_for
from quantkit.models.loading import LoadedModel
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import LayerStats
from quantkit.schemes import QuantScheme

ADAPTER = adapter_for("llama")
CALIB = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
TINY_SEARCH = SearchBudget(generations=3, offspring=4, survivors=(2, 1), windows=(1, 4))


def _options(target: float, **kw) -> AllocationOptions:
    return AllocationOptions(target, kl_windows=4, kl_seqlen=32, search=TINY_SEARCH, **kw)


def _hessian(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(256, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return 2 / 256 * x.T @ x


@pytest.mark.parametrize(
    "method,scheme,options",
    [
        ("rtn", QuantScheme(3, 32, False), {}),
        ("gptq", QuantScheme(4, 32, True), {"act_order": True}),  # g_idx stored
        ("gptq", QuantScheme(2, 32, True), {"act_order": True, "static_groups": True}),
        ("gptq", QuantScheme(8, -1, True), {"act_order": True}),
        ("rtn", QuantScheme(4, 16, True, "nvfp4"), {}),
        ("rtn", QuantScheme(4, 32, True, "mxfp4"), {}),
        ("gptq", QuantScheme(4, 32, True, "fp4"), {}),
        ("spqr", QuantScheme(3, 16, False), {}),
    ],
)
def test_layout_bytes_equal_the_bytes_written(method: str, scheme: QuantScheme, options: dict) -> None:
    quantizer = make_quantizer(method, **options)
    weight = torch.randn(24, 80, generator=torch.Generator().manual_seed(1))  # 80 = 2.5 groups of 32
    qt = quantizer.quantize(weight, LayerStats(hessian=_hessian(80), tokens=256), scheme)
    written = sum(t.numel() * t.element_size() for t in qt.to_tensors().values())
    meta = quantizer.plan(scheme).meta((24, 80))
    if method == "spqr":
        assert qt.meta()["outliers"] > 0  # outliers are data: the layout counts none, the tensor counts them
        meta = {**meta, "outliers": qt.meta()["outliers"]}
    assert LayerCost()(meta, (24, 80)) == written == LayerCost().of(qt)


def _written(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_bytes_of_gptq_and_compressed_tensors_checkpoints(act_order: bool, dtype: torch.dtype) -> None:
    from quantkit.layouts import compressed_tensors as ct
    from quantkit.layouts import gptq

    quantizer = make_quantizer("gptq", act_order=act_order)
    weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    for scheme in (QuantScheme(2, 32, True), QuantScheme(3, 32, True), QuantScheme(8, -1, True)):
        qt = quantizer.quantize(weight, LayerStats(hessian=_hessian(96), tokens=256), scheme)
        meta = quantizer.plan(scheme).meta((24, 96))
        assert LayerCost("gptq", dtype)(meta, (24, 96)) == _written(gptq.encode(qt))
        if not act_order and scheme.bits != 3:
            assert LayerCost("compressed-tensors", dtype)(meta, (24, 96)) == _written(ct.encode(qt, dtype))


def test_budget_is_the_typed_decimal_rounded_down() -> None:
    assert budget_bytes(3.3, 10) == 4  # 3.3 * 10 / 8 = 4.125; a binary 3.3 would not change this
    assert budget_bytes(3.2, 5) == 2  # exactly 2.0 bytes: float 3.2 * 5 / 8 is 1.9999999999999998
    with pytest.raises(QuantkitError, match="positive"):
        budget_bytes(float("nan"), 10)


def test_units_at_each_granularity() -> None:
    assert [u.name for u in make_units(ADAPTER, ADAPTER.get_blocks(tiny_model()), "block")] == ["model.layers.0", "model.layers.1"]
    groups = make_units(ADAPTER, ADAPTER.get_blocks(tiny_model()), "group")
    assert len(groups) == 8 and groups[0].layers == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    linears = make_units(ADAPTER, ADAPTER.get_blocks(tiny_model()), "linear")
    assert len(linears) == 14 and all(len(u.layers) == 1 for u in linears) and linears[-1].block == 1
    with pytest.raises(QuantkitError, match="granularity"):
        make_units(ADAPTER, ADAPTER.get_blocks(tiny_model()), "head")


def test_output_nmse_against_the_activations() -> None:
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(10, 50, generator=g, dtype=torch.float64)
    q = w + 0.1 * torch.randn(6, 10, generator=g, dtype=torch.float64)
    expected = float(((w - q) @ x).square().sum() / (w @ x).square().sum())
    assert output_nmse(w.float(), [q.float(), w.float()], 2 / 50 * x @ x.T) == pytest.approx([expected, 0.0], rel=1e-5)


def test_database_propagation_width_is_the_uniform_engine_run() -> None:
    model, reference = tiny_model(), tiny_model()
    quantizer = make_quantizer("gptq", act_order=True)
    schemes = [QuantScheme(2, 32, True), QuantScheme(4, 32, True)]
    original = {n: p.clone() for n, p in model.state_dict().items()}
    database = build_database(model, ADAPTER, quantizer, schemes, 1, CALIB)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, original[name]), f"{name} was not restored"
    quantize_model(reference, ADAPTER, quantizer, lambda _: schemes[1], CALIB)
    for layer, choices in database.layers.items():
        assert torch.equal(choices.weights[1], reference.get_submodule(layer).weight)
        assert choices.nmse[0] > choices.nmse[1] > 0
        assert [m["bits"] for m in choices.metas] == [2, 4]


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    p = torch.log_softmax(teacher.double(), -1)
    return float((p.exp() * (p - torch.log_softmax(student.double(), -1))).sum(-1).mean())


def test_kl_meter_against_full_forwards() -> None:
    model = tiny_model()
    windows = CALIB[:3, :32]
    meter = KLMeter(model, ADAPTER, windows)
    assert meter() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        teacher = model(windows).logits
        model.model.layers[1].mlp.down_proj.weight.mul_(4.0)
        student = model(windows).logits
    expected = _kl(teacher.reshape(-1, teacher.shape[-1]), student.reshape(-1, student.shape[-1]))
    assert meter() == pytest.approx(expected, rel=1e-3)
    assert meter(start_block=1) == pytest.approx(expected, rel=1e-3)  # cached inputs of block 1
    assert meter([2]) == pytest.approx(_kl(teacher[2], student[2]), rel=1e-3)


def test_lim_and_zd_scores_against_direct_computation() -> None:
    model = tiny_model()
    with torch.no_grad():
        hidden = model(CALIB, output_hidden_states=True).hidden_states
    cos = torch.nn.functional.cosine_similarity(hidden[0], hidden[1], dim=-1)
    assert lim_scores(model, ADAPTER, CALIB, batch_size=3)[0] == pytest.approx(-float(cos.mean()), rel=1e-5)
    values = torch.tensor([0.0] * 8 + [10.0, 10.0])  # mean 2, std 4.2: the two tens have z 1.9
    assert zd_score([values[:4], values[4:]]) == pytest.approx(0.2)


def test_ranked_allocation_moves_the_least_important_down() -> None:
    model = tiny_model()
    options = _options(6.0, strategy="ranked", score="zd", granularity="block")
    sens = measure(model, ADAPTER, make_quantizer("rtn"), QuantScheme(4, 32, True), options, None, ["zd"])
    low, high = sorted(range(2), key=lambda u: sens.scores["zd"][u])
    # A target that fits the important block at 8 bits and the other at 4, not both at 8.
    nbytes = sens.costs[low][2] + sens.costs[high][3]
    target = math.ceil(8 * nbytes / sum(sens.weights) * 10**4) / 10**4
    plan = choose(sens, model, replace(options, target_bits=target))
    assert [u.bits for u in plan.units][low] == 4 and [u.bits for u in plan.units][high] == 8


def _moves(seed: int = 0) -> tuple[list[list[int]], BudgetedMoves]:
    rng = random.Random(seed)
    costs = [sorted(rng.sample(range(10, 200), 4)) for _ in range(12)]
    sizes = [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    return costs, BudgetedMoves(costs, sum(row[1] for row in costs) + 15, sizes, random.Random(seed))


def test_moves_stay_within_the_budget_and_fill_it() -> None:
    costs, moves = _moves()
    start = random_allocation(moves)
    assert moves.cost(start) <= moves.budget
    slack = moves.budget - moves.cost(start)
    assert all(c + 1 == 4 or costs[u][c + 1] - costs[u][c] > slack for u, c in enumerate(start))  # nothing more fits
    for _ in range(200):
        child = moves.mutate(start)
        assert child is not None and child != start and moves.cost(child) <= moves.budget


def test_search_improves_a_known_objective_within_the_budget() -> None:
    costs, moves = _moves(1)
    rng = random.Random(1)
    errors = [[rng.random() * 4.0 ** -c for c in range(4)] for _ in costs]

    def fitness(allocation: list[int], _windows) -> float:
        return sum(errors[u][c] for u, c in enumerate(allocation))

    start = random_allocation(moves)
    best, history = evolve(start, moves, fitness, SearchBudget(30, 8, (3, 1), (1, 1)), 1, rng)
    assert moves.cost(best) <= moves.budget
    assert fitness(best, None) < fitness(start, None)
    assert history == sorted(history, reverse=True)  # the elitist parent never gets worse


def test_search_budget_is_validated() -> None:
    with pytest.raises(QuantkitError, match="ending with 1"):
        SearchBudget(2, 4, (2, 2), (1, 2))


@pytest.mark.parametrize("strategy,score", [("solver", "error"), ("solver", "kl"), ("ranked", "lim"), ("random", None),
                                            ("auto", None)])
def test_every_strategy_meets_the_target_from_below(strategy: str, score: str | None) -> None:
    model = tiny_model()
    weights = {n: p.clone() for n, p in model.named_parameters()}
    options = _options(5.0, strategy=strategy, score=score, granularity="linear")
    quantizer = make_quantizer("gptq", act_order=True, static_groups=True)
    sens = measure(model, ADAPTER, quantizer, QuantScheme(4, 32, True), options, CALIB, options.scores)
    plan = choose(sens, model, options)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())  # weights left as they were
    assert plan.strategy == strategy and (strategy != "auto" or len(plan.search_history) == 3)
    assert plan.nbytes <= plan.budget_bytes == budget_bytes(5.0, plan.weights)
    # Within one layer's granularity: the slack is less than the largest one-level step of any unit.
    steps = [row[c + 1] - row[c] for row in sens.costs for c in range(len(row) - 1)]
    assert 0 <= plan.budget_bytes - plan.nbytes < max(steps)
    chosen = [options.bit_choices.index(u.bits) for u in plan.units]
    assert plan.nbytes == sum(sens.costs[u][c] for u, c in enumerate(chosen))


def test_uneven_costs_keep_random_and_ranked_allocations_in_budget() -> None:
    costs = [[30, 20, 40], [30, 20, 40], [12, 10, 50]]  # the narrowest width costs more (outliers)
    moves = BudgetedMoves(costs, 60, [1, 1, 2], random.Random(0))
    for _ in range(20):
        allocation = random_allocation(moves)
        assert moves.cost(allocation) <= 60
        assert moves.cost(moves.mutate(allocation) or allocation) <= 60
    with pytest.raises(QuantkitError, match="ranked allocation cannot meet"):
        ranked_allocation([1.0, 2.0, 3.0], costs, 45)


def test_impossible_target_is_refused_before_any_measurement() -> None:
    with pytest.raises(QuantkitError, match="below the cheapest allocation"):
        plan_allocation(tiny_model(), ADAPTER, make_quantizer("gptq"), QuantScheme(4, 32, True), _options(2.0), None)


@pytest.mark.parametrize(
    "layout,choices,method",
    [("native", (2, 3, 4, 8), "gptq"), ("gptq", (2, 3, 4, 8), "gptq"), ("compressed-tensors", (2, 4, 8), "rtn")],
)
def test_mixed_checkpoint_meets_the_target_and_loads_to_the_fake_quant_model(
    tmp_path: Path, tiny_model_dir: Path, calib_file: Path, layout: str, choices: tuple, method: str
) -> None:
    options = _options(5.0, bit_choices=choices, strategy="solver", score="error")
    extra = {"act_order": True, "static_groups": True} if method == "gptq" else {}
    result = quantize(str(tiny_model_dir), method, QuantScheme(4, 32, True), CalibrationSpec(str(calib_file), 8, 64),
                      tmp_path / "ckpt", layout=layout, allocation=options, **extra)
    info = inspect_checkpoint(tmp_path / "ckpt")
    record = result.quantization_config["allocation"]
    assert info.bits_per_weight <= 5.0 and info.bits_per_weight == pytest.approx(record["bits_per_weight"])
    planned = {layer: qt.scheme.bits for layer, qt in result.quantized.items()}
    assert planned == record["layer_bits"] == info.layer_bits and len(set(planned.values())) > 1
    # Within one layer's granularity of the target: less than the largest one-width step of any layer.
    quantizer, cost = make_quantizer(method, **extra), LayerCost(layout, torch.float32)
    steps = []
    for qt in result.quantized.values():
        sizes = [cost(quantizer.plan(replace(qt.scheme, bits=b)).meta(qt.shape), qt.shape) for b in choices]
        steps += [high - low for low, high in zip(sizes, sizes[1:])]
    assert 5.0 - info.bits_per_weight < 8 * max(steps) / info.quantized_weights
    loaded = quantkit.load(tmp_path / "ckpt", kernel="dequant")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, result.model(CALIB).logits, rtol=0, atol=1e-5)


def test_saved_plan_reproduces_the_allocation_and_is_checked(tmp_path: Path, tiny_model_dir: Path) -> None:
    quantizer_options = {"act_order": True, "static_groups": True}
    calibration = CalibrationSpec("synthetic", 4, 32)
    plan = quantkit.api.allocate(str(tiny_model_dir), _options(5.5, strategy="ranked", score="zd"), "gptq",
                                 QuantScheme(4, 32, True), calibration, **quantizer_options)
    plan.save(tmp_path / "plan.json")
    again = AllocationPlan.load(tmp_path / "plan.json")
    assert again.to_dict() == plan.to_dict()
    result = quantize(str(tiny_model_dir), "gptq", QuantScheme(4, 32, True), calibration, allocation=again,
                      **quantizer_options)
    assert {layer: qt.scheme.bits for layer, qt in result.quantized.items()} == plan.layer_bits
    with pytest.raises(QuantkitError, match="made for group_size 32"):
        quantize(str(tiny_model_dir), "gptq", QuantScheme(4, 16, True), calibration, allocation=again,
                 **quantizer_options)
    # The GPTQ layout always writes g_idx: the same widths no longer fit the target counted natively.
    with pytest.raises(QuantkitError, match="over its target"):
        quantize(str(tiny_model_dir), "gptq", QuantScheme(4, 32, True), calibration, tmp_path / "gptq",
                 layout="gptq", allocation=again, **quantizer_options)
    assert not (tmp_path / "gptq").exists()
    data = plan.to_dict()
    data["units"] = data["units"][1:]
    with pytest.raises(QuantkitError, match="missing from the plan"):
        quantize(str(tiny_model_dir), "gptq", QuantScheme(4, 32, True), calibration,
                 allocation=AllocationPlan.from_dict(data), **quantizer_options)
    (tmp_path / "bad.json").write_text(json.dumps({**plan.to_dict(), "units": [{"name": "x"}]}))
    with pytest.raises(QuantkitError, match="invalid allocation"):
        AllocationPlan.load(tmp_path / "bad.json")


def test_transform_factors_count_in_the_budget(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    from quantkit.models.loading import load_model
    from quantkit.transforms import make_transform

    loaded: LoadedModel = load_model(str(tiny_model_dir))
    result = quantize(loaded, "rtn", QuantScheme(4, 32, True), CalibrationSpec(str(calib_file), 4, 64),
                      tmp_path / "ckpt", transform=make_transform("hadamard"),
                      allocation=_options(6.0, strategy="solver", score="zd"))
    info = inspect_checkpoint(tmp_path / "ckpt")
    assert info.total.role_bytes["transform"] > 0
    assert info.bits_per_weight <= 6.0
    assert info.bits_per_weight == pytest.approx(result.quantization_config["allocation"]["bits_per_weight"])


def test_cli_allocate_then_quantize_with_the_plan(tmp_path: Path, tiny_model_dir: Path) -> None:
    plan_path = tmp_path / "alloc.json"
    out = run_cli("allocate", str(tiny_model_dir), "--bits", "5.5", "--allocation", "ranked", "--score", "zd",
                  "--method", "rtn", "--group-size", "32", "--report", str(plan_path))
    assert out.returncode == 0, out.stderr
    assert "bits per linear" in out.stdout and plan_path.is_file()
    out = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", "--allocation",
                  str(plan_path), "-o", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    out = run_cli("inspect", str(tmp_path / "ckpt"))
    assert out.returncode == 0 and "bits per linear" in out.stdout
    plan = AllocationPlan.load(plan_path)
    assert inspect_checkpoint(tmp_path / "ckpt").layer_bits == plan.layer_bits


@pytest.mark.parametrize(
    "args,message",
    [
        (["--bits", "3.5"], "needs --allocation"),
        (["--score", "zd"], "--score needs --allocation"),
        (["--allocation", "plan.json", "--score", "zd"], "cannot change a saved allocation plan"),
        (["--bits", "3.5", "--allocation", "greedy"], "--allocation 'greedy' is not allowed"),
        (["--bits", "3.5", "--allocation", "solver", "--bit-choices", "4,2"], "bit choices"),
        (["--bits", "1.0", "--allocation", "solver", "--score", "zd"], "below the cheapest allocation"),
        (["--allocation", "missing-plan.json"], "allocation plan not found"),
    ],
)
def test_cli_refuses_bad_allocation_options(tmp_path: Path, tiny_model_dir: Path, args: list[str], message: str) -> None:
    out = run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--group-size", "32", *args,
                  "-o", str(tmp_path / "ckpt"))
    assert_one_line_error(out, message)
    assert not (tmp_path / "ckpt").exists()


def test_spqr_checkpoint_never_exceeds_the_target(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    options = _options(6.0, bit_choices=(3, 4, 8), strategy="solver", score="zd")
    try:
        quantize(str(tiny_model_dir), "spqr", QuantScheme(3, 16, False), CalibrationSpec(str(calib_file), 8, 64),
                 tmp_path / "ckpt", allocation=options)
    except QuantkitError as exc:
        assert "over the target" in str(exc) and not (tmp_path / "ckpt").exists()
    else:
        info = inspect_checkpoint(tmp_path / "ckpt")
        assert info.total.outliers > 0 and info.bits_per_weight <= 6.0


def test_float_formats_refuse_mixed_widths(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(QuantkitError, match="integer grid"):
        quantize(str(tiny_model_dir), "rtn", QuantScheme(4, 16, True, "nvfp4"), allocation=_options(5.0))


def test_options_are_validated() -> None:
    with pytest.raises(QuantkitError, match="unknown allocation score"):
        _options(3.0, score="hessian")
    with pytest.raises(QuantkitError, match="random allocation uses no score"):
        _options(3.0, strategy="random", score="zd")
    with pytest.raises(QuantkitError, match="propagation width"):
        _options(3.0, propagate_bits=5)
    assert replace(_options(3.0), strategy="ranked").chosen_score == "lim"
