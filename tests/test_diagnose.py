"""`quantkit diagnose`: attribution against full-model references, the relative output error against a float64
reference, the repair's bisection and its plan consumed by `quantize --allocation`, the report files, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, run_cli

import quantkit
from quantkit.allocation.kl import Divergence
from quantkit.allocation.plan import AllocationPlan
from quantkit.api import CalibrationSpec, quantize
from quantkit.diagnose.repair import RepairTarget
from quantkit.diagnose.run import DiagnoseRequest, run_diagnose
from quantkit.models.loading import load_model
from quantkit.schemes import QuantScheme

WINDOWS, SEQLEN = 4, 64


@pytest.fixture(scope="module")
def w2_checkpoint(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("diagnose") / "w2"
    quantize(str(tiny_model_dir), method="gptq", scheme=QuantScheme(2, 16, True), output=output,
             calibration=CalibrationSpec(str(calib_file), 8, SEQLEN))
    return output


def _request(base: Path, quantized: Path, calib_file: Path, **extra) -> DiagnoseRequest:
    return DiagnoseRequest(str(base), str(quantized), heldout=str(calib_file), windows=WINDOWS, seqlen=SEQLEN,
                           calibration=str(calib_file), nsamples=4, calib_seqlen=SEQLEN, **extra)


@pytest.fixture(scope="module")
def diagnosis(tiny_model_dir: Path, w2_checkpoint: Path, calib_file: Path) -> dict:
    return run_diagnose(_request(tiny_model_dir, w2_checkpoint, calib_file))


def _reference(model, weights: dict[str, torch.Tensor], ids: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float]:
    """KL(teacher ‖ model) per token and top-1 agreement, from whole-model logits with ``weights`` in place."""
    own = {name: model.get_submodule(name).weight.data for name in weights}
    for name, weight in weights.items():
        model.get_submodule(name).weight.data = weight
    with torch.no_grad():
        student = torch.log_softmax(model(ids).logits.double(), dim=-1)
    for name, weight in own.items():
        model.get_submodule(name).weight.data = weight
    kl = float((teacher.exp() * (teacher - student)).sum(-1).mean())
    return kl, float((teacher.argmax(-1) == student.argmax(-1)).double().mean())


def test_attribution_equals_whole_model_references(diagnosis: dict, tiny_model_dir: Path, w2_checkpoint: Path,
                                                   calib_file: Path) -> None:
    """Every unit and block: KL and top-1 with only it quantized (float model) and only it restored (quantized
    model), against logits of the whole model run end to end on the same windows."""
    model = load_model(str(tiny_model_dir)).model
    loaded = quantkit.load(w2_checkpoint, kernel="dequant")
    quantized = {name: loaded.get_submodule(name).quantized().dequantize(torch.float32)
                 for name in (u["name"] for u in diagnosis["units"])}
    tokenizer = quantkit.load_tokenizer(tiny_model_dir)
    ids = torch.tensor(tokenizer(calib_file.read_text())["input_ids"][: WINDOWS * SEQLEN]).reshape(WINDOWS, SEQLEN)
    with torch.no_grad():
        teacher = torch.log_softmax(model(ids).logits.double(), dim=-1)
    floats = {name: model.get_submodule(name).weight.data for name in quantized}
    total = _reference(model, quantized, ids, teacher)
    assert diagnosis["total"]["kl"] == pytest.approx(total[0], rel=1e-3) and diagnosis["total"]["top1"] == total[1]
    assert diagnosis["total"]["kl"] > 0
    assert len(diagnosis["units"]) == 14 and len(diagnosis["blocks"]) == 2
    for unit in diagnosis["units"] + diagnosis["blocks"]:
        alone = _reference(model, {n: quantized[n] for n in unit["layers"]}, ids, teacher)
        restored = _reference(model, {**quantized, **{n: floats[n] for n in unit["layers"]}}, ids, teacher)
        assert unit["kl_alone"] == pytest.approx(alone[0], rel=1e-3, abs=1e-3 * diagnosis["total"]["kl"]), unit["name"]
        assert unit["kl_restored"] == pytest.approx(restored[0], rel=1e-3, abs=1e-3 * diagnosis["total"]["kl"]), unit["name"]
        assert (unit["top1_alone"], unit["top1_restored"]) == (alone[1], restored[1])
        assert unit["gain"] == pytest.approx(diagnosis["total"]["kl"] - unit["kl_restored"])


def test_output_error_equals_a_float64_reference(diagnosis: dict, tiny_model_dir: Path, w2_checkpoint: Path,
                                                 calib_file: Path) -> None:
    """``‖(W - Q) x‖² / ‖W x‖²`` of one linear over the float model's inputs on the calibration windows."""
    from quantkit.calib.sources import load_calibration

    loaded = load_model(str(tiny_model_dir))
    name = "model.layers.1.mlp.down_proj"
    linear = loaded.model.get_submodule(name)
    q = quantkit.load(w2_checkpoint, kernel="dequant").get_submodule(name).quantized().dequantize(torch.float64)
    inputs: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].double().reshape(-1, args[0].shape[-1])))
    calib = load_calibration(str(calib_file), loaded.tokenizer, 4, SEQLEN, 0)
    with torch.no_grad():
        loaded.model(calib)
    handle.remove()
    x, w = torch.cat(inputs), linear.weight.double()
    reference = float(((x @ (w - q).T) ** 2).sum() / ((x @ w.T) ** 2).sum())
    unit = next(u for u in diagnosis["units"] if u["name"] == name)
    assert unit["output_error"] == pytest.approx(reference, rel=1e-4)


def test_repair_plan_meets_the_target_when_quantize_consumes_it(tiny_model_dir: Path, w2_checkpoint: Path,
                                                                calib_file: Path, diagnosis: dict,
                                                                tmp_path: Path) -> None:
    """The bisection's answer is the smallest count it saw meeting the target (the count below it missed), the
    plan raises exactly those units, and the checkpoint quantized from the plan lands near the target."""
    target = diagnosis["total"]["kl"] * 0.4
    plan_file = tmp_path / "plan.json"
    report = run_diagnose(_request(tiny_model_dir, w2_checkpoint, calib_file, target=RepairTarget("kl", target),
                                   plan=plan_file))
    repair = report["repair"]
    tried = {entry["count"]: entry["kl"] for entry in repair["tried"]}
    count = repair["count"]
    assert 0 < count < 14 and tried[count] <= target and tried[count - 1] > target
    order = [u["name"] for u in sorted(report["units"], key=lambda u: -u["gain"])]
    assert repair["units"] == order[:count]
    plan = json.loads(plan_file.read_text())
    assert {u["name"] for u in plan["units"] if u["bits"] == 8} == set(repair["units"])
    assert {u["bits"] for u in plan["units"]} == {2, 8} and plan["strategy"] == "repair"
    assert repair["added_bytes"] > 0
    repaired = tmp_path / "repaired"
    quantize(str(tiny_model_dir), method="gptq", scheme=QuantScheme(2, 16, True), output=repaired,
             calibration=CalibrationSpec(str(calib_file), 8, SEQLEN), allocation=AllocationPlan.load(plan_file))
    after = run_diagnose(_request(tiny_model_dir, repaired, calib_file))
    assert after["total"]["kl"] <= target * 1.5  # GPTQ at 8 bits, where the search stood round-to-nearest in


def test_top1_targets_are_met_from_above_and_kl_targets_from_below(tiny_model_dir: Path, w2_checkpoint: Path,
                                                                     calib_file: Path, diagnosis: dict) -> None:
    """A top-1 target is met at or above its value, a KL target at or below; on this tiny model the W2 checkpoint
    already agrees on every top-1 token, so a target of 1.0 needs no unit raised."""
    assert RepairTarget("top1", 0.9).met(Divergence(kl=5.0, top1=0.9))
    assert not RepairTarget("top1", 0.9).met(Divergence(kl=0.0, top1=0.89))
    assert RepairTarget("kl", 0.1).met(Divergence(kl=0.1, top1=0.0))
    assert not RepairTarget("kl", 0.1).met(Divergence(kl=0.11, top1=1.0))
    assert diagnosis["total"]["top1"] == 1.0
    report = run_diagnose(_request(tiny_model_dir, w2_checkpoint, calib_file, target=RepairTarget("top1", 1.0)))
    assert report["repair"]["count"] == 0 and report["repair"]["target"] == {"metric": "top1", "value": 1.0}
    assert report["repair"]["tried"] == [{"count": 0, "kl": diagnosis["total"]["kl"], "top1": 1.0}]


def test_cli_writes_tables_json_and_heatmap(tiny_model_dir: Path, w2_checkpoint: Path, calib_file: Path,
                                            tmp_path: Path) -> None:
    done = run_cli("diagnose", str(tiny_model_dir), str(w2_checkpoint), "--heldout", str(calib_file), "--windows", "2",
                   "--seqlen", "32", "--calib", str(calib_file), "--nsamples", "2", "--calib-seqlen", "32",
                   "--granularity", "group", "--report", str(tmp_path / "report"))
    assert done.returncode == 0, done.stderr
    assert "KL gain" in done.stdout and "model.layers.1" in done.stdout
    report = json.loads((tmp_path / "report" / "diagnose.json").read_text())
    assert report["format"] == "quantkit-diagnose" and report["settings"]["granularity"] == "group"
    assert sorted(len(u["layers"]) for u in report["units"] if u["block"] == 0) == [1, 1, 2, 3]  # o, down, gate/up, qkv
    assert (tmp_path / "report" / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags,fragments", [
    (["--target-kl", "0.1"], ["--target-kl needs --repair"]),
    (["--target-top1", "0.9"], ["--target-top1 needs --repair"]),
    (["--repair"], ["--repair takes one target: --target-kl or --target-top1"]),
    (["--repair", "--target-kl", "0.1", "--target-top1", "0.9"], ["--repair takes one target"]),
    (["--repair", "--target-top1", "1.5"], ["the top1 target must be a number in [0, 1], got 1.5"]),
    (["--granularity", "row"], ["unknown --granularity 'row'"]),
])
def test_bad_options_are_one_line_errors(flags: list[str], fragments: list[str], tiny_model_dir: Path,
                                         w2_checkpoint: Path, tmp_path: Path) -> None:
    done = run_cli("diagnose", str(tiny_model_dir), str(w2_checkpoint), *flags, "--report", str(tmp_path / "r"))
    assert_one_line_error(done, *fragments)
    assert not (tmp_path / "r").exists()


def test_a_checkpoint_that_is_not_of_the_base_is_refused(tiny_model_dir: Path, calib_file: Path,
                                                          tmp_path: Path) -> None:
    done = run_cli("diagnose", str(tiny_model_dir), str(tmp_path / "missing"), "--report", str(tmp_path / "r"))
    assert_one_line_error(done, "model not found", "missing")
    not_quantized = run_cli("diagnose", str(tiny_model_dir), str(tiny_model_dir), "--heldout", str(calib_file),
                            "--calib", str(calib_file), "--report", str(tmp_path / "r"))
    assert_one_line_error(not_quantized, "is not a quantkit checkpoint")
    assert not (tmp_path / "r").exists()
