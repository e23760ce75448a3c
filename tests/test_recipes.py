"""Recipes: parsing and validation, the flag ↔ field mapping, round trips, and every shipped recipe running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
import yaml
from safetensors.torch import load_file
from test_cli import assert_one_line_error, run_cli

import quantkit
from quantkit.api import quantize_run
from quantkit.calib.sources import SYNTHETIC_WINDOWS, TEXT_WINDOWS
from quantkit.cli import RUN_OPTIONS, app
from quantkit.errors import QuantkitError
from quantkit.recipes import FIELDS, Recipe, find_recipe, recipe_from_settings, resolve, shipped_recipes
from quantkit.recipes.build import run_plan

NOT_RECIPE_OPTIONS = {"ctx", *RUN_OPTIONS}
SHIPPED = sorted(shipped_recipes())


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_every_quantize_option_is_a_recipe_field_and_back() -> None:
    command = typer.main.get_command(app).commands["quantize"]
    options = {p.name for p in command.params} - NOT_RECIPE_OPTIONS
    assert options == {f.param for f in FIELDS}
    flags = {opt for p in command.params for opt in p.opts}
    assert {f.flag for f in FIELDS} <= flags
    assert len({f.name for f in FIELDS}) == len(FIELDS)


def test_the_shipped_recipes_cover_every_method_format_transform_and_layout() -> None:
    recipes = [Recipe.load(shipped_recipes()[name]) for name in SHIPPED]
    seen = {key: {r.values.get(key) for r in recipes} for key in ("method", "number_format", "transform", "layout")}
    assert seen["method"] >= {"rtn", "gptq", "spqr"}
    assert seen["number_format"] >= {"int", "mxfp4", "nvfp4", "fp8"}
    assert seen["transform"] >= {"hadamard", "flatquant", "ostquant", "awq", "smoothquant", "mergequant"}
    assert seen["layout"] >= {"native", "gptq", "compressed-tensors"}
    assert any(r.values.get("allocation") for r in recipes) and any(r.values.get("act_bits") for r in recipes)
    for name, recipe in zip(SHIPPED, recipes):
        assert recipe.name == name and recipe.description


@pytest.mark.parametrize("name", SHIPPED)
def test_recipe_round_trips_through_yaml(name: str, tmp_path: Path) -> None:
    recipe = Recipe.load(find_recipe(name))
    copy = tmp_path / "copy.yaml"
    recipe.save(copy)
    again = Recipe.load(copy)
    assert (again.values, again.name, again.description) == (recipe.values, recipe.name, recipe.description)
    assert list(tmp_path.iterdir()) == [copy]


def _small(recipe: Recipe, calib_file: Path) -> dict[str, object]:
    """Flags that shrink a shipped recipe to the tiny model (64 hidden, 160 intermediate) and a few seconds."""
    small: dict[str, object] = {"calib": str(calib_file), "nsamples": 4, "seqlen": 32}
    if recipe.values.get("number_format", "int") in ("int", "fp8") and recipe.values.get("group_size", 16) != -1:
        small["group_size"] = 16
    if recipe.values.get("block_rows", 1) > 1:
        small["block_rows"] = 16
    if recipe.values.get("act_group_size", -1) > 0:
        small["act_group_size"] = 16
    steps = set(str(recipe.values.get("transform")).split("+"))
    if steps & {"flatquant", "ostquant"}:
        small |= {"transform_nsamples": 2, "transform_seqlen": 16, "transform_epochs": 1, "transform_batch_size": 1}
    if steps & {"awq", "smoothquant", "mergequant"}:
        small |= {"transform_nsamples": 4, "transform_seqlen": 32}
    if recipe.values.get("allocation"):
        small |= {"allocation": "solver", "score": "error"}  # KL and the search need 8 × 256 tokens
    return small


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_quantizes_and_loads(name: str, tmp_path: Path, tiny_model_dir: Path,
                                                  calib_file: Path) -> None:
    recipe = Recipe.load(find_recipe(name))
    settings = resolve(recipe, _small(recipe, calib_file))
    for param, value in recipe.values.items():
        if param not in _small(recipe, calib_file):
            assert settings[param] == value, param
    out = tmp_path / "out"
    result = quantize_run(str(tiny_model_dir), run_plan(settings), output=out)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == {"native": "quantkit", "gptq": "gptq",
                                      "compressed-tensors": "compressed-tensors"}[settings["layout"]]
    if settings["layout"] == "native":
        assert config["method"] == settings["method"] and config["scheme"]["format"] == settings["number_format"]
        assert (config["transform"] or {}).get("name") == settings["transform"]
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(quantkit.load(out)(ids).logits, result.model(ids).logits, rtol=1e-4, atol=1e-4)


FLAGS = ["--method", "gptq", "--bits", "3", "--group-size", "16", "--no-act-order", "--damp", "0.05", "--mse",
         "--act-bits", "8", "--transform", "hadamard", "--nsamples", "4", "--seqlen", "32", "--seed", "5"]


def test_cli_flags_to_recipe_to_the_same_run(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    saved = tmp_path / "saved.yaml"
    first = run_cli("quantize", str(tiny_model_dir), *FLAGS, "--calib", str(calib_file), "-o", str(tmp_path / "a"),
                    "--save-recipe", str(saved))
    assert first.returncode == 0, first.stderr
    recipe = Recipe.load(saved)
    expected = {"method": "gptq", "bits": 3, "group_size": 16, "act_order": False, "damp": 0.05, "mse": True,
                "act_bits": 8, "transform": "hadamard", "nsamples": 4, "seqlen": 32, "seed": 5,
                "calib": str(calib_file), "sym": True, "number_format": "int", "layout": "native"}
    assert {k: recipe.values[k] for k in expected} == expected
    second = run_cli("quantize", str(tiny_model_dir), "--recipe", str(saved), "-o", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_a, config_b = ((tmp_path / d / "config.json").read_text() for d in "ab")
    assert config_a == config_b


def test_flags_override_recipe_fields(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    recipe = Recipe.load(find_recipe("gptq-w4g64"))
    settings = resolve(recipe, {"bits": 3, "calib": "x.txt", "act_order": None})
    assert settings["bits"] == 3 and settings["calib"] == "x.txt"
    assert settings["act_order"] is True and settings["group_size"] == 64 and settings["nsamples"] == 128
    assert resolve(None, {})["method"] == "gptq" and resolve(None, {})["nsamples"] is None  # the source's default
    text = run_plan(resolve(None, {})).calibration
    synthetic = run_plan(resolve(None, {"calib": "synthetic"})).calibration
    assert (text.nsamples, text.seqlen, synthetic.nsamples, synthetic.seqlen) == (*TEXT_WINDOWS, *SYNTHETIC_WINDOWS)
    proc = run_cli("quantize", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--group-size", "32", "--bits", "8",
                   "--calib", str(calib_file), "--nsamples", "2", "--seqlen", "16", "-o", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert config["method"] == "rtn" and config["scheme"]["bits"] == 8 and config["scheme"]["group_size"] == 32


def test_settings_without_a_switch_leave_their_section_out() -> None:
    settings = resolve(None, {"transform_budget": "cpu"})
    data = recipe_from_settings(settings, "plain").to_dict()
    assert "transform" not in data and "allocation" not in data and "activations" not in data
    assert data["quantizer"]["method"] == "gptq" and data["export"] == {"layout": "native", "dtype": "auto"}


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("quantizer:\n  method: awq\n", ["quantizer.method = 'awq' is not allowed", "allowed: rtn, gptq, spqr"]),
        ("weights:\n  bitz: 4\n", ["unknown field weights.bitz", "allowed in weights: bits, format, group_size, block_rows, sym"]),
        ("scheme:\n  bits: 4\n", ["unknown section 'scheme'", "allowed:", "quantizer"]),
        ("calibration:\n  nsamples: many\n", ["calibration.nsamples = 'many' is not allowed", "an integer ≥ 1"]),
        ("calibration:\n  nsamples: 2.5\n", ["calibration.nsamples = 2.5"]),
        ("quantizer:\n  act_order: 1\n", ["quantizer.act_order = 1", "true or false"]),
        ("weights:\n  group_size: 0\n", ["weights.group_size = 0", "or -1"]),
        ("calibration:\n  seed: 100000000000000000000\n", ["calibration.seed", "≤ 4294967295"]),
        ("quantizer:\n  damp: .inf\n", ["quantizer.damp = inf", "a finite number ≥ 0"]),
        ("weights:\n  bits: .nan\n", ["weights.bits = nan"]),
        ("weights:\n  format: fp6\n", ["weights.format = 'fp6'", "int, fp4, mxfp4, nvfp4, fp8"]),
        ("activations:\n  bits: 6\n", ["activations.bits = 6", "allowed: 4, 8"]),
        ("allocation:\n  strategy: greedy\n", ["allocation.strategy = 'greedy'", "or a .json file"]),
        ("allocation:\n  bit_choices: 4\n", ["allocation.bit_choices = 4", "a list of integers"]),
        ("transform:\n  name: spinquant\n", ["transform.name = 'spinquant'", "hadamard, flatquant, ostquant, awq, smoothquant, mergequant"]),
        ("transform:\n  name: hadamard+spinquant\n", ["transform.name = 'hadamard+spinquant'", "or several joined by +"]),
        ("export:\n  layout: awq\n", ["export.layout = 'awq'", "native, gptq, compressed-tensors"]),
        ("weights: 4\n", ["section weights must be a mapping"]),
        ("- a\n- b\n", ["expected a mapping of sections"]),
        ("name: [x]\n", ["name = ['x'] is not allowed"]),
        ("quantizer:\n  method: gptq\n bad", ["not valid YAML at line"]),
        ("", ["is empty"]),
    ],
)
def test_invalid_recipes_name_the_field_value_and_allowed(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, text)
    with pytest.raises(QuantkitError) as info:
        Recipe.load(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for fragment in fragments:
        assert fragment in message, message


def test_fractional_bits_need_an_allocation(tmp_path: Path) -> None:
    recipe = Recipe.load(write(tmp_path, "weights:\n  bits: 3.5\n"))
    with pytest.raises(QuantkitError, match=r"weights.bits = 3.5 is not allowed without allocation.strategy"):
        resolve(recipe, {}, "r.yaml")
    assert resolve(recipe, {"allocation": "solver"})["bits"] == 3.5
    assert resolve(recipe, {"bits": 4})["bits"] == 4


def test_cli_refuses_bad_recipes_in_one_line_and_writes_nothing(tmp_path: Path, tiny_model_dir: Path) -> None:
    bad = write(tmp_path, "quantizer:\n  method: gptq\n  damp: -1\n")
    out = tmp_path / "out"
    assert_one_line_error(run_cli("quantize", str(tiny_model_dir), "--recipe", str(bad), "-o", str(out)),
                          "quantizer.damp = -1 is not allowed", "a finite number ≥ 0")
    assert_one_line_error(run_cli("quantize", str(tiny_model_dir), "--recipe", "no-such-recipe", "-o", str(out)),
                          "no recipe named 'no-such-recipe'", "gptq-w4g64")
    assert_one_line_error(run_cli("quantize", str(tiny_model_dir), "--recipe", str(tmp_path / "x.yaml"),
                                  "-o", str(out)), "x.yaml not found")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_recipes_command_lists_and_shows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")
    listing = run_cli("recipes")
    assert listing.returncode == 0, listing.stderr
    assert all(name in listing.stdout for name in SHIPPED)
    assert "spqr · int w3 g16 asym" in listing.stdout
    shown = run_cli("recipes", "spqr-w3g16")
    assert shown.returncode == 0 and "outlier_threshold: 0.2" in shown.stdout
    assert Recipe.from_dict(yaml.safe_load(shown.stdout), "shown").values["method"] == "spqr"


def test_the_readme_recipe_example_is_a_valid_recipe() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("### Recipes", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    recipe = Recipe.from_dict(yaml.safe_load(block), "README.md")
    assert {f.section for f in FIELDS} == set(recipe.to_dict()) - {"name", "description"}
    assert recipe.values["transform"] == "flatquant" and recipe.values["bit_choices"] == [2, 3, 4, 8]


def test_recipe_fields_take_their_special_values() -> None:
    recipe = Recipe.from_dict({"quantizer": {"method": "spqr", "outlier_threshold": float("inf")},
                               "activations": {"bits": 8, "group_size": -1}}, "r")
    assert recipe.values["outlier_threshold"] == float("inf") and recipe.values["act_group_size"] == -1


def test_flags_that_change_a_switch_drop_the_recipe_fields_that_belong_to_it() -> None:
    gptq = Recipe.load(find_recipe("gptq-w4g64"))
    rtn = resolve(gptq, {"method": "rtn"})
    assert rtn["act_order"] is None and rtn["damp"] is None and rtn["group_size"] == 64
    nvfp4 = resolve(gptq, {"number_format": "nvfp4"})
    assert nvfp4["group_size"] is None and nvfp4["sym"] is None and nvfp4["bits"] is None
    mixed = Recipe.load(find_recipe("mixed-3.5bit-gptq"))
    planned = resolve(mixed, {"allocation": "plan.json"})
    assert planned["bits"] is None and planned["bit_choices"] is None and planned["score"] is None
    assert resolve(mixed, {"allocation": "solver"})["bits"] == 3.5  # another strategy keeps the target
    uniform = resolve(mixed, {"allocation": "none"})
    assert uniform["allocation"] is None and uniform["bits"] is None
    quarot = Recipe.load(find_recipe("quarot-w4a4-gptq"))
    assert resolve(quarot, {"transform": "none"})["transform"] is None
    ost = Recipe.load(find_recipe("ostquant-w4a16-gptq"))
    assert resolve(ost, {"transform": "flatquant"})["transform_budget"] == "cpu"


@pytest.mark.parametrize("flags,fragments", [
    (["--seed", "-1"], ["--seed -1 is not allowed", "an integer ≥ 0"]),
    (["--bits", "nan"], ["--bits nan is not allowed", "a finite number"]),
    (["--allocation", "solver", "--bits", "5", "--bit-choices", ","], ["--bit-choices [] is not allowed"]),
    (["--transform", "rotate"], ["--transform 'rotate' is not allowed; allowed: hadamard, flatquant, ostquant"]),
])
def test_cli_flags_are_checked_like_recipe_fields(flags: list[str], fragments: list[str], tmp_path: Path,
                                                  tiny_model_dir: Path) -> None:
    proc = run_cli("quantize", str(tiny_model_dir), *flags, "-o", str(tmp_path / "o"))
    assert_one_line_error(proc, *fragments)
    assert proc.returncode == 2 and not (tmp_path / "o").exists()


def test_save_recipe_pins_allocation_and_activation_defaults_and_repeats_the_run(
        tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    saved = tmp_path / "mixed.yaml"
    flags = ["--allocation", "solver", "--bits", "5", "--score", "error", "--group-size", "16", "--act-bits", "8",
             "--act-group-size", "-1", "--calib", str(calib_file), "--nsamples", "4", "--seqlen", "32"]
    first = run_cli("quantize", str(tiny_model_dir), *flags, "-o", str(tmp_path / "a"), "--save-recipe", str(saved))
    assert first.returncode == 0, first.stderr
    recipe = Recipe.load(saved)
    assert recipe.values["bit_choices"] == [2, 3, 4, 8] and recipe.values["granularity"] == "linear"
    assert recipe.values["bits"] == 5 and recipe.values["act_group_size"] == -1
    second = run_cli("quantize", str(tiny_model_dir), "--recipe", str(saved), "-o", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "config.json").read_text() == (tmp_path / "b" / "config.json").read_text()


def test_save_recipe_to_a_directory_is_refused_before_any_work(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert_one_line_error(run_cli("quantize", str(tiny_model_dir), "--save-recipe", str(tmp_path),
                                  "-o", str(tmp_path / "o")), "is a directory")
    assert not (tmp_path / "o").exists()


def test_a_command_line_run_builds_its_quantizer_once(tmp_path: Path, tiny_model_dir: Path, calib_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags and a recipe resolve to one run plan: its quantizer is built once, though the run also pins the
    settings it took into a saved recipe."""
    from typer.testing import CliRunner

    from quantkit.quantizers import QUANTIZERS
    from quantkit.quantizers.rtn import RTNQuantizer

    built = []

    class CountedRTN(RTNQuantizer):
        def __init__(self, *args, **kwargs) -> None:
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(QUANTIZERS, "rtn", CountedRTN)
    result = CliRunner().invoke(app, ["quantize", str(tiny_model_dir), "--recipe", "rtn-w4g64", "--mse",
                                      "--calib", str(calib_file), "-o", str(tmp_path / "out"),
                                      "--save-recipe", str(tmp_path / "saved.yaml")])
    assert result.exit_code == 0, result.output
    assert len(built) == 1 and built[0].mse is True
    assert Recipe.load(tmp_path / "saved.yaml").values["mse"] is True
