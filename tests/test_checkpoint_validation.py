"""Checkpoints that never load wrong: plain transformers refuses a native checkpoint instead of loading random
weights, quantized configs quantkit cannot read are refused (never scored as float models), shard indexes and
config fields are type-checked, inspect refuses exactly what load refuses, activation quantization shows in
inspect and eval reports, and loaded models give their inputs gradients (per kernel: test_lora.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file, save_file
from test_cli import assert_one_line_error, run_cli
from test_fuzz_checkpoints import mutate, mutations

import quantkit
from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.actquant import activation_scheme
from quantkit.api import CalibrationSpec, quantize
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.config_fields import check_type
from quantkit.engine import quantize_model
from quantkit.errors import QuantkitError
from quantkit.eval.models import load_target
from quantkit.export.save import save_checkpoint
from quantkit.layouts.native import FORMAT_VERSION
from quantkit.models.architectures import adapter_for
from quantkit.quantizers import make_quantizer
from quantkit.schemes import QuantScheme
from quantkit.transforms import make_transform

CALIB = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(4))
NVFP4 = QuantScheme.for_format("nvfp4", 4, None, None, 16, True)
LAYER = "model.layers.0.mlp.up_proj"
# (layout, method, scheme, quantizer options) of the checkpoints the corruptions start from
ORIGINALS = {
    "native-int": ("native", "gptq", QuantScheme(4, 16, False), {"g_idx": True}),
    "native-spqr": ("native", "spqr", QuantScheme(3, 16, False), {"outlier_threshold": 0.2}),
    "native-nvfp4": ("native", "rtn", NVFP4, {}),
    "gptq": ("gptq", "gptq", QuantScheme(4, 16, True), {"g_idx": True}),
    "compressed-tensors": ("compressed-tensors", "rtn", QuantScheme(4, 16, False), {}),
}


def write_checkpoint(folder: Path, layout: str, method: str, scheme: QuantScheme, options: dict,
                     max_shard_bytes: int = 2**31) -> None:
    model = tiny_model()
    quantized = quantize_model(model, adapter_for("llama"), make_quantizer(method, **options), lambda _: scheme, CALIB)
    save_checkpoint(layout, folder, model, tiny_tokenizer(), quantized, {"method": method, "quantizer": options},
                    max_shard_bytes=max_shard_bytes)


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("originals")
    for name, spec in ORIGINALS.items():
        write_checkpoint(root / name, *spec)
    return {name: root / name for name in ORIGINALS}


@pytest.fixture()
def copy_of(originals: dict[str, Path], tmp_path: Path):
    def copy(name: str) -> Path:
        return Path(shutil.copytree(originals[name], tmp_path / name))

    return copy


def edit_config(folder: Path, edit) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def refusal(action, folder: Path) -> str | None:
    """The one-line message ``action(folder)`` refuses with, or None when it succeeds."""
    try:
        action(folder)
    except QuantkitError as exc:
        assert str(exc) and "\n" not in str(exc)
        return str(exc)
    return None


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------- 1. plain transformers never loads random weights

PLAIN_TRANSFORMERS = "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"


def test_plain_transformers_refuses_a_native_checkpoint(originals: dict[str, Path]) -> None:
    folder = originals["native-int"]
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["format_version"] == FORMAT_VERSION
    # a fresh interpreter that never imports quantkit, as a user of plain transformers runs it
    proc = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(folder)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert "RuntimeError" in proc.stderr and "ignore_mismatched_sizes" in proc.stderr
    assert "torch.Size([0])" in proc.stderr  # the placeholder is what it refused


def test_version_1_checkpoints_without_placeholders_still_load(copy_of) -> None:
    v2 = copy_of("native-int")
    v1 = Path(shutil.copytree(v2, v2.parent / "v1"))
    layers = json.loads((v1 / "config.json").read_text())["quantization_config"]["layers"]
    edit_tensors(v1, lambda t: [t.pop(f"{layer}.weight") for layer in layers])
    edit_config(v1, lambda c: c["quantization_config"].update(format_version=1))
    torch.testing.assert_close(logits(quantkit.load(v1)), logits(quantkit.load(v2)), rtol=0, atol=0)
    # the placeholders take no place in inspect's sizes and roles: only the files differ
    info1, info2 = inspect_checkpoint(v1).to_dict(), inspect_checkpoint(v2).to_dict()
    for info in (info1, info2):
        info.pop("path"), info.pop("file_bytes"), info["quantization_config"].pop("format_version")
    assert info1 == info2
    # a version-2 checkpoint needs its placeholders; a version-1 one has none
    edit_config(v1, lambda c: c["quantization_config"].update(format_version=2))
    assert refusal(quantkit.load, v1) == "checkpoint is missing 14 tensor(s), e.g. model.layers.0.mlp.down_proj.weight"
    edit_config(v2, lambda c: c["quantization_config"].update(format_version=1))
    assert refusal(quantkit.load, v2) == "checkpoint has 14 unexpected tensor(s), e.g. model.layers.0.mlp.down_proj.weight"


def test_placeholders_hold_no_data_and_only_the_native_layout_has_them(originals: dict[str, Path],
                                                                         tmp_path: Path, tiny_model_dir: Path,
                                                                         calib_file: Path) -> None:
    native = load_file(str(originals["native-nvfp4"] / "model.safetensors"))
    assert native[f"{LAYER}.weight"].shape == (0,) and native[f"{LAYER}.weight"].dtype == torch.uint8
    for layout in ("gptq", "compressed-tensors"):  # exactly what vLLM and GPTQModel read
        names = load_file(str(originals[layout] / "model.safetensors"))
        assert f"{LAYER}.weight" not in names and "model.embed_tokens.weight" in names
    streamed = tmp_path / "streamed"  # the --offload disk writer shares the native tensors
    quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 32, True), output=streamed, offload="disk",
             calibration=CalibrationSpec(str(calib_file), 2, 16))
    names = {n for f in streamed.glob("*.safetensors") for n in load_file(str(f))}
    assert f"{LAYER}.weight" in names and "model.layers.1.self_attn.o_proj.weight" in names
    assert quantkit.load(streamed) is not None


# ---------------------------------------------------------------- 2. quantized configs quantkit cannot read

UNREADABLE_CONFIGS = [
    (lambda qc: qc.update(format_version=99), "unsupported checkpoint format 'native' version 99; this quantkit reads"),
    (lambda qc: qc.update(format_version=0), "unsupported checkpoint format 'native' version 0"),
    (lambda qc: qc.update(format_version="2"), "unsupported checkpoint format 'native' version '2'"),
    (lambda qc: qc.update(layers=[]), "no per-layer table"),
    (lambda qc: qc.update(quant_method="foo"), "quantized with quant_method 'foo', which quantkit does not load"),
    (lambda qc: qc.update(quant_method=["quantkit"]), "quant_method ['quantkit'], which quantkit does not load"),
]


@pytest.mark.parametrize("edit,message", UNREADABLE_CONFIGS)
def test_eval_refuses_a_quantization_config_quantkit_cannot_read(copy_of, edit, message: str) -> None:
    folder = copy_of("native-int")
    edit_config(folder, lambda c: edit(c["quantization_config"]))
    assert message in refusal(load_target, folder)
    assert refusal(quantkit.load, folder) == refusal(inspect_checkpoint, folder)


@pytest.mark.parametrize("value,shown", [("abc", 'str "abc"'), ([1, 2], "list [1, 2]"), (5, "int 5"),
                                         (True, "bool true")])
def test_a_quantization_config_that_is_not_an_object_is_one_line(copy_of, value, shown: str) -> None:
    folder = copy_of("native-int")
    edit_config(folder, lambda c: c.update(quantization_config=value))
    for action in (load_target, quantkit.load, inspect_checkpoint):
        assert refusal(action, folder) == f"corrupt quantization_config in {folder / 'config.json'}: {shown}, not an object"


def test_cli_eval_of_an_unreadable_checkpoint_fails_without_scoring(copy_of, calib_file: Path, tmp_path: Path) -> None:
    folder = copy_of("native-int")
    edit_config(folder, lambda c: c["quantization_config"].update(quant_method="foo"))
    report = tmp_path / "report"
    proc = run_cli("eval", str(folder), "--ppl", str(calib_file), "--seqlen", "16", "--max-windows", "1",
                   "--report", str(report))
    assert_one_line_error(proc, "quant_method 'foo', which quantkit does not load")
    assert not report.exists()


# ---------------------------------------------------------------- 3. shard indexes

def sharded(folder: Path) -> Path:
    write_checkpoint(folder, *ORIGINALS["native-int"], max_shard_bytes=20_000)
    return folder / "model.safetensors.index.json"


@pytest.mark.parametrize("edit,message", [
    (lambda i: i.update(weight_map=[["model.norm.weight", "model-00001-of-00009.safetensors"]]),
     "must map tensor names to shard file names, got [["),
    (lambda i: i.update(weight_map=None), "must map tensor names to shard file names, got null"),
    (lambda i: i.pop("weight_map"), "must map tensor names to shard file names, got null"),
    (lambda i: i["weight_map"].update({"model.norm.weight": 1}), "gives model.norm.weight the shard 1, not a file name"),
    (lambda i: i["weight_map"].update({"model.norm.weight": None}), "gives model.norm.weight the shard null, not a"),
    (lambda i: i["weight_map"].update({"model.norm.weight": ["x"]}), 'gives model.norm.weight the shard ["x"], not a'),
])
def test_shard_index_of_the_wrong_shape_is_one_line(tmp_path: Path, edit, message: str) -> None:
    index = sharded(tmp_path / "ckpt")
    data = json.loads(index.read_text())
    edit(data)
    index.write_text(json.dumps(data))
    for action in (quantkit.load, inspect_checkpoint, load_target):
        assert refusal(action, index.parent).startswith(f"corrupt checkpoint index {index}: its weight_map {message}")


@pytest.mark.parametrize("shard", ["../model-00001-of-00009.safetensors", "sub/x.safetensors", "", "."])
def test_shard_names_outside_the_folder_or_absent_are_refused(tmp_path: Path, shard: str) -> None:
    index = sharded(tmp_path / "ckpt")
    data = json.loads(index.read_text())
    data["weight_map"]["model.norm.weight"] = shard
    index.write_text(json.dumps(data))
    assert refusal(inspect_checkpoint, index.parent) == f"checkpoint shard {shard!r} named in {index.name} is missing"
    index.write_text("[1, 2]")
    assert "its weight_map must map tensor names" in refusal(quantkit.load, index.parent)


# ---------------------------------------------------------------- 4. JSON types of config fields

def native_layer(key: str, value: object):
    return lambda c: c["quantization_config"]["layers"][LAYER].update({key: value})


def top(key: str, value: object):
    return lambda c: c["quantization_config"].update({key: value})


def ct_weights(key: str, value: object):
    return lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update({key: value})


WRONG_TYPES = [
    ("native-int", native_layer("bits", "4"), f"checkpoint entry for {LAYER} is incomplete or invalid: bits is '4', expected an integer"),
    ("native-int", native_layer("bits", 4.5), "bits is 4.5, expected an integer"),
    ("native-int", native_layer("bits", 4.0), "bits is 4.0, expected an integer"),
    ("native-int", native_layer("bits", True), "bits is True, expected an integer"),
    ("native-int", native_layer("bits", 0), "unsupported bit width 0"),
    ("native-int", native_layer("group_size", "32"), "group_size is '32', expected an integer"),
    ("native-int", native_layer("symmetric", "no"), "symmetric is 'no', expected true or false"),
    ("native-int", native_layer("symmetric", 0), "symmetric is 0, expected true or false"),
    ("native-int", native_layer("act_order", "yes"), "act_order is 'yes', expected true or false"),
    ("native-int", native_layer("scale_dtype", 16), "scale_dtype is 16, expected a string"),
    ("native-int", native_layer("kind", 5), "kind is 5, expected a string"),
    ("native-int", native_layer("shape", [160.0, 64]), f"checkpoint records shape [160.0, 64] for {LAYER}"),
    ("native-int", native_layer("shape", "160x64"), f"checkpoint records shape '160x64' for {LAYER}"),
    ("native-spqr", native_layer("stat_bits", "3"), "stat_bits is '3', expected an integer"),
    ("native-spqr", native_layer("outliers", 2.0), "outliers is 2.0, expected an integer"),
    ("native-spqr", native_layer("permuted", 1), "permuted is 1, expected true or false"),
    ("native-nvfp4", native_layer("group_size", 16.0), "group_size is 16.0, expected an integer"),
    ("native-nvfp4", native_layer("format", None), "format is None, expected a string"),
    ("native-int", top("input_activations", {"bits": "4", "format": "int", "group_size": -1}),
     "corrupt input_activations in quantization_config: bits is '4', expected an integer"),
    ("native-int", top("input_activations", {"bits": 4, "format": "int"}), "group_size is missing"),
    ("native-int", top("input_activations", "a4"), "corrupt input_activations in quantization_config: 'a4' is not an object"),
    ("native-int", top("transform", {"name": "hadamard", "online": {LAYER: ["8", 8]}}),
     f"online transform factor of {LAYER} is '8', expected an integer"),
    ("native-int", top("transform", {"name": "hadamard", "online": {LAYER: [64]}}), "expected two factor sizes"),
    ("native-int", top("transform", {"name": "hadamard", "activation_clip": {LAYER: "0.5"}}),
     f"activation clipping ratio of {LAYER} is '0.5', expected a number"),
    ("native-int", top("transform", {"name": 3}), "corrupt transform record in quantization_config: name is 3"),
    ("gptq", top("bits", "4"), "invalid GPTQ quantization config: bits is '4', expected an integer"),
    ("gptq", top("bits", 4.0), "invalid GPTQ quantization config: bits is 4.0, expected an integer"),
    ("gptq", top("sym", "no"), "invalid GPTQ quantization config: sym is 'no', expected true or false"),
    ("gptq", top("desc_act", "yes"), "invalid GPTQ quantization config: desc_act is 'yes', expected true or false"),
    ("gptq", top("group_size", "16"), "invalid GPTQ quantization config: group_size is '16', expected an integer"),
    ("gptq", top("dynamic", {r"+:.*down_proj": {"bits": "8"}}),
     r"GPTQ dynamic entry '+:.*down_proj': bits is '8', expected an integer"),
    ("compressed-tensors", ct_weights("num_bits", "4"), "compressed-tensors config group group_0: weights num_bits is '4', expected an integer"),
    ("compressed-tensors", ct_weights("group_size", "16"), "weights group_size is '16', expected an integer"),
    ("compressed-tensors", ct_weights("symmetric", "no"), "weights symmetric is 'no', expected true or false"),
    ("compressed-tensors", ct_weights("strategy", 5), "weights strategy is 5, expected a string"),
    ("compressed-tensors", ct_weights("type", ["int"]), "weights type is ['int'], expected a string"),
    ("compressed-tensors", ct_weights("actorder", 1), "weights unknown actorder 1"),
    ("compressed-tensors", ct_weights("dynamic", "no"), "dynamic compressed-tensors weight quantization is not supported"),
    ("compressed-tensors", top("ignore", [1]), "compressed-tensors ignore entry is not a list of module names"),
]


@pytest.mark.parametrize("original,edit,message", WRONG_TYPES)
def test_config_fields_of_the_wrong_json_type_are_refused(copy_of, original: str, edit, message: str) -> None:
    folder = copy_of(original)
    edit_config(folder, edit)
    refused = refusal(quantkit.load, folder)
    assert refused is not None and message in refused
    assert refusal(inspect_checkpoint, folder) == refused


def test_json_types_follow_json_not_python() -> None:
    assert check_type(4, int, "bits") == 4 and check_type(2, float, "ratio") == 2.0
    assert check_type(False, bool, "sym") is False
    for value, kind in [(True, int), (4.0, int), ("4", int), (True, float), (float("nan"), float), ("1", float),
                        (1, bool), ("true", bool), (None, str), ((1, 2), list), ([], dict)]:
        with pytest.raises(QuantkitError, match="expected"):
            check_type(value, kind, "field")


# ---------------------------------------------------------------- 5. inspect refuses exactly what load refuses

def tensor(name: str, change):
    """A damage: the stored tensor ``name`` replaced by ``change(tensor)`` (dropped when that is None)."""
    def damage(folder: Path) -> None:
        def edit(tensors: dict) -> None:
            changed = change(tensors.pop(name))
            if changed is not None:
                tensors[name] = changed
        edit_tensors(folder, edit)
    return damage


def nan_first(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


E4M3_NAN = 0x7F
NAMED_CORRUPTIONS = [
    ("native-int", tensor(f"{LAYER}.qzeros", lambda t: None), f"missing 1 tensor(s), e.g. {LAYER}.qzeros"),
    ("native-int", lambda f: edit_config(f, native_layer("bits", 0)), "unsupported bit width 0"),
    ("native-int", tensor(f"{LAYER}.scales", torch.Tensor.float), "scales has shape [160, 4] F32, expected [160, 4] F16"),
    ("native-int", tensor(f"{LAYER}.qweight", lambda t: t[:, :4].contiguous()), "[160, 4] I32, expected [160, 8] I32"),
    ("native-int", tensor(f"{LAYER}.scales", nan_first), f"tensor {LAYER}.scales contains NaN or infinite values"),
    ("native-int", tensor("model.embed_tokens.weight", lambda t: t.index_fill(0, torch.tensor([3]), float("inf"))),
     "tensor model.embed_tokens.weight contains NaN or infinite values"),
    ("native-int", tensor(f"{LAYER}.g_idx", lambda t: torch.full_like(t, 4)), f"{LAYER}: g_idx refers to groups outside [0, 4)"),
    ("native-int", tensor(f"{LAYER}.weight", lambda t: None), f"missing 1 tensor(s), e.g. {LAYER}.weight"),
    ("native-int", tensor(f"{LAYER}.weight", lambda t: torch.zeros(160, 64)),
     f"tensor {LAYER}.weight has shape [160, 64] F32, expected [0] U8"),
    ("native-int", lambda f: edit_tensors(f, lambda t: t.update(extra=torch.zeros(1))), "1 unexpected tensor(s), e.g. extra"),
    ("native-int", truncate, "corrupt or truncated checkpoint file model.safetensors"),
    ("native-spqr", tensor(f"{LAYER}.perm", torch.zeros_like), f"{LAYER}: SpQR permutation is not a permutation"),
    ("native-spqr", tensor(f"{LAYER}.outlier_row_offsets", lambda t: t.flip(0)), "outlier row offsets are not"),
    ("native-spqr", tensor(f"{LAYER}.scale_scale", torch.Tensor.float), "scale_scale has shape"),
    ("native-nvfp4", tensor(f"{LAYER}.weight_scale", torch.zeros_like), "weight_scale holds 640 invalid e4m3 scale(s)"),
    ("native-nvfp4", tensor(f"{LAYER}.weight_global_scale", torch.neg), "weight_global_scale must be a positive"),
    ("native-nvfp4", tensor(f"{LAYER}.weight_scale", lambda t: t.view(torch.uint8).fill_(E4M3_NAN).view(t.dtype)),
     f"tensor {LAYER}.weight_scale contains NaN or infinite values"),
    ("gptq", tensor(f"{LAYER}.g_idx", lambda t: t + 100), f"{LAYER}: g_idx refers to groups outside [0, 4)"),
    ("gptq", tensor(f"{LAYER}.qzeros", lambda t: t.to(torch.int64)), "qzeros has shape [4, 20] I64, expected [4, 20] I32"),
    ("compressed-tensors", tensor(f"{LAYER}.weight_shape", lambda t: t + 1), "weight_shape [161, 65] does not match"),
]


@pytest.mark.parametrize("original,damage,message", NAMED_CORRUPTIONS)
def test_inspect_refuses_what_load_refuses_with_the_same_message(copy_of, original: str, damage, message: str) -> None:
    folder = copy_of(original)
    damage(folder)
    refused = refusal(quantkit.load, folder)
    assert refused is not None and message in refused
    assert refusal(inspect_checkpoint, folder) == refused


def test_cli_inspect_of_a_corrupt_checkpoint_is_one_line(copy_of) -> None:
    folder = copy_of("native-int")
    tensor(f"{LAYER}.scales", nan_first)(folder)
    assert_one_line_error(run_cli("inspect", str(folder)), f"tensor {LAYER}.scales contains NaN or infinite values")
    assert_one_line_error(run_cli("inspect", str(folder), "--json"), f"tensor {LAYER}.scales contains NaN")


@pytest.mark.parametrize("original", ["native-int", "gptq", "compressed-tensors"])
def test_property_inspect_and_load_agree_on_every_mutation(originals: dict[str, Path], tmp_path_factory,
                                                           original: str) -> None:
    work = tmp_path_factory.mktemp(f"agree-{original}")
    outcomes = set()

    @settings(max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(mutation=mutations())
    def check(mutation: tuple[str, dict]) -> None:
        folder = work / "ckpt"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(originals[original], folder)
        mutate(folder, *mutation)
        refused = refusal(quantkit.load, folder)
        assert refusal(inspect_checkpoint, folder) == refused
        outcomes.add(refused is None)

    check()
    assert outcomes == {True, False}  # the mutations both damaged and spared checkpoints


# ---------------------------------------------------------------- 6. activation quantization is visible

def test_activation_scheme_shows_in_inspect(tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4a4"
    quantize(str(tiny_model_dir), method="rtn", scheme=NVFP4, act_scheme=activation_scheme(4, "nvfp4"), output=out)
    info = inspect_checkpoint(out).to_dict()
    assert [s["scheme"] for s in info["schemes"]] == ["nvfp4 g16 + a4 nvfp4 g16"]
    assert info["activations"] == {"bits": 4, "group_size": 16, "symmetric": True, "format": "nvfp4", "static": None,
                                   "label": "a4 nvfp4 g16"}
    assert info["online_transform"] is None
    out8 = tmp_path / "w4a8-hadamard"
    quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 32, True), act_scheme=activation_scheme(8, "int"),
             transform=make_transform("hadamard"), output=out8, calibration=CalibrationSpec(str(calib_file), 2, 16))
    info = inspect_checkpoint(out8)
    online = set(json.loads((out8 / "config.json").read_text())["quantization_config"]["transform"]["online"])
    labels = {s.scheme: s.layers for s in info.schemes}
    assert labels == {"int w4 g32 sym + a8 int per-token": 14 - len(online),
                      "int w4 g32 sym + a8 int per-token + online hadamard": len(online)}
    assert online and info.online_transform == "hadamard" and info.activations["label"] == "a8 int per-token"


def test_eval_report_names_the_activation_scheme(tiny_model_dir: Path, calib_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "w4a8"
    quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 32, True), act_scheme=activation_scheme(8, "int"),
             output=out)
    report = tmp_path / "report"
    proc = run_cli("eval", str(out), "--ppl", str(calib_file), "--seqlen", "16", "--max-windows", "1",
                   "--report", str(report))
    assert proc.returncode == 0, proc.stderr
    text = (report / "report.json").read_text()
    assert "int w4 g32 sym + a8 int per-token" in text


# ---------------------------------------------------------------- 7. autograd through loaded models

def test_a_loaded_model_trains_its_inputs(originals: dict[str, Path]) -> None:
    """Outside torch.no_grad(): a prompt-tuning style gradient through every quantized layer of a loaded model."""
    for name in ("native-int", "native-spqr", "native-nvfp4"):
        model = quantkit.load(originals[name])
        embeddings = model.get_input_embeddings()(torch.randint(0, 320, (1, 24))).detach().requires_grad_(True)
        model(inputs_embeds=embeddings).logits.square().mean().backward()
        assert embeddings.grad is not None and torch.isfinite(embeddings.grad).all() and embeddings.grad.abs().sum() > 0
