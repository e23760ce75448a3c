"""Mixed precision in the GPTQ layout through GPTQModel's ``dynamic`` config: export, load, inspect, convert,
the patterns vLLM matches against its fused modules, and hand-edited configs."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_export_formats import CALIB, _config, quantize_tiny

import quantkit
from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.api import export
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.engine import quantize_model
from quantkit.errors import QuantkitError
from quantkit.export.save import save_checkpoint
from quantkit.layouts import gptq
from quantkit.models.architectures import adapter_for
from quantkit.quantizers import make_quantizer
from quantkit.runtime.loader import open_checked
from quantkit.schemes import QuantScheme

BASE = QuantScheme(4, 16, True)
# 8-bit q/k/v in block 0 (fused by vLLM), 3-bit q alone in block 1 (not fused), 2-bit down in block 0 with
# gate/up of block 1, and a group size of 32 for one layer; the 4/16 rest covers the most weights.
MIXED = {
    "model.layers.0.self_attn.q_proj": QuantScheme(8, 16, True),
    "model.layers.0.self_attn.k_proj": QuantScheme(8, 16, True),
    "model.layers.0.self_attn.v_proj": QuantScheme(8, 16, True),
    "model.layers.0.mlp.down_proj": QuantScheme(2, 16, True),
    "model.layers.1.self_attn.q_proj": QuantScheme(3, 16, True),
    "model.layers.1.self_attn.o_proj": QuantScheme(4, 32, True),
    "model.layers.1.mlp.gate_proj": QuantScheme(2, 16, True),
    "model.layers.1.mlp.up_proj": QuantScheme(2, 16, True),
}


def mixed_scheme(name: str) -> QuantScheme:
    return MIXED.get(name, BASE)


def resolve(qc: dict, name: str) -> tuple[int, int] | None:
    """(bits, group size) of module ``name`` as vLLM's ``get_dynamic_override`` reads the config: patterns in
    order, ``re.match`` on the name without its prefix, the first match wins, ``-:`` means not quantized."""
    for key, override in qc.get("dynamic", {}).items():
        if key.startswith("-:"):
            if re.match(key[2:], name):
                return None
        elif re.match(key[2:] if key.startswith("+:") else key, name):
            return override.get("bits", qc["bits"]), override.get("group_size", qc["group_size"])
    return qc["bits"], qc["group_size"]


def overridden(qc: dict, name: str) -> bool:
    return any(re.match(key.removeprefix("+:"), name) for key in qc.get("dynamic", {}))


def save_mixed(folder: Path, method: str, scheme_for: Callable[[str], QuantScheme], **options) -> tuple[torch.nn.Module, dict, dict]:
    model = tiny_model()
    quantized = quantize_model(model, adapter_for("llama"), make_quantizer(method, **options), scheme_for, CALIB)
    save_checkpoint("gptq", folder, model, tiny_tokenizer(), quantized, _config(method, options))
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    return model, quantized, qc


def assert_same_logits(folder: Path, model: torch.nn.Module) -> None:
    with torch.no_grad():
        torch.testing.assert_close(quantkit.load(folder)(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method,options", [("rtn", {}), ("gptq", {"act_order": True})])
def test_mixed_checkpoint_round_trips(tmp_path: Path, method: str, options: dict) -> None:
    folder = tmp_path / "gptq"
    model, quantized, qc = save_mixed(folder, method, mixed_scheme, **options)
    assert (qc["bits"], qc["group_size"], qc["sym"]) == (4, 16, True)
    assert json.loads((folder / gptq.CONFIG_FILE).read_text()) == qc
    assert len(qc["dynamic"]) == 4 and all(key.startswith("+:") for key in qc["dynamic"])
    assert {"group_size": 32} in qc["dynamic"].values()  # only the keys that differ from the top level
    for name, qt in quantized.items():
        assert resolve(qc, name) == (qt.scheme.bits, qt.scheme.group_size), name
        assert overridden(qc, name) == (name in MIXED), name
    assert_same_logits(folder, model)

    plans = open_checked(folder).plans
    assert {name: (plan.meta["bits"], plan.meta["group_size"]) for name, plan in plans.items()} == {
        name: (qt.scheme.bits, qt.scheme.group_size) for name, qt in quantized.items()
    }
    labels = Counter({tuple(s.scheme.split()[1:3]): s.layers for s in inspect_checkpoint(folder).schemes})
    assert labels == Counter((f"w{qt.scheme.bits}", f"g{qt.scheme.group_size}") for qt in quantized.values())

    export(folder, tmp_path / "native", "native")
    native = json.loads((tmp_path / "native" / "config.json").read_text())["quantization_config"]["layers"]
    assert {name: (m["bits"], m["group_size"]) for name, m in native.items()} == {
        name: (qt.scheme.bits, qt.scheme.group_size) for name, qt in quantized.items()
    }
    assert_same_logits(tmp_path / "native", model)


def test_patterns_name_the_modules_vllm_fuses(tmp_path: Path) -> None:
    _, _, qc = save_mixed(tmp_path / "gptq", "rtn", mixed_scheme)
    assert resolve(qc, "model.layers.0.self_attn.qkv_proj") == (8, 16)  # q, k and v share 8 bits
    assert resolve(qc, "model.layers.1.mlp.gate_up_proj") == (2, 16)  # gate and up share 2 bits
    assert not overridden(qc, "model.layers.1.self_attn.qkv_proj")  # only q is 3-bit
    assert not overridden(qc, "model.layers.0.mlp.gate_up_proj")
    assert not overridden(qc, "model.layers.0.self_attn.q_proj_extra")  # patterns are anchored


def test_a_tie_takes_the_first_layers_scheme(tmp_path: Path) -> None:
    """Block 0 at 8 bits and block 1 at 4 bits cover as many weights: the top level is block 0's scheme."""
    model, quantized, qc = save_mixed(tmp_path / "gptq", "rtn",
                                      lambda name: QuantScheme(8 if ".0." in name else 4, 16, True))
    assert qc["bits"] == 8 and list(qc["dynamic"].values()) == [{"bits": 4}]
    assert all(overridden(qc, name) == (".1." in name) for name in quantized)
    assert resolve(qc, "model.layers.1.self_attn.qkv_proj") == resolve(qc, "model.layers.1.mlp.gate_up_proj") == (4, 16)
    assert_same_logits(tmp_path / "gptq", model)


def test_uniform_checkpoints_have_no_dynamic_and_asymmetric_layers_are_refused() -> None:
    _, quantized = quantize_tiny("rtn", BASE)
    assert "dynamic" not in gptq.build_config(quantized, _config("rtn", {}), lm_head=False)
    _, asymmetric = quantize_tiny("rtn", QuantScheme(8, 16, False))
    name = "model.layers.1.mlp.down_proj"
    with pytest.raises(QuantkitError, match="asymmetric"):
        gptq.build_config({**quantized, name: asymmetric[name]}, _config("rtn", {}), lm_head=False)


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("mixed") / "gptq"
    model, _, _ = save_mixed(folder, "rtn", mixed_scheme)
    return folder, model


def edited(tmp_path: Path, source: Path, edit: Callable[[dict], dict]) -> Path:
    """A copy of ``source`` whose ``dynamic`` config is ``edit(dynamic)``."""
    folder = tmp_path / "ckpt"
    shutil.copytree(source, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["dynamic"] = edit(config["quantization_config"]["dynamic"])
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda d: {"-:.*down_proj": {}, **d}, r"'-:\.\*down_proj' says model\.layers\.0\.mlp\.down_proj is not quantized"),
        (lambda d: {**d, "+:model.layers.(0": {"bits": 8}}, "not a valid regular expression"),
        (lambda d: {**d, "+:.*lm_head": {"bits": 8, "quant_method": "awq"}}, "overrides 'quant_method'"),
        (lambda d: {**d, "+:.*lm_head": 8}, "must map to a dict"),
        (lambda d: {**d, "+:.*lm_head": {"bits": 5}}, "bit width 5"),
        (lambda d: {"+:.*": {"bits": 4, "group_size": 16}, **d}, "qweight has shape"),  # the first match wins
    ],
)
def test_hand_edited_dynamic_is_refused(tmp_path: Path, mixed_checkpoint: tuple[Path, torch.nn.Module], edit,
                                        message: str) -> None:
    folder = edited(tmp_path, mixed_checkpoint[0], edit)
    with pytest.raises(QuantkitError, match=message) as info:
        quantkit.load(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: {key: {**value, "damp_percent": 0.05, "mse": 2.0} for key, value in d.items()},
        lambda d: {"-:lm_head": {}, **d, "-:.*embed_tokens": {}},  # excludes only modules stored unquantized
    ],
)
def test_hand_edited_dynamic_that_keeps_the_layout_loads(tmp_path: Path, mixed_checkpoint: tuple[Path, torch.nn.Module],
                                                         edit) -> None:
    folder, model = mixed_checkpoint
    assert_same_logits(edited(tmp_path, folder, edit), model)
