"""transformers' from_pretrained loads a native checkpoint as quantkit.load does, and leaves other layouts to
transformers' own quantizers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from test_house import QUANTIZATION
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
from transformers.quantizers.quantizer_gptq import GptqHfQuantizer

import quantkit
from quantkit.api import CalibrationSpec, quantize
from quantkit.errors import QuantkitError
from quantkit.integrations import transformers as integration
from quantkit.integrations.hf_quantizer import QuantkitConfig, QuantkitHfQuantizer
from quantkit.layouts.native import QUANT_METHOD
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme
from quantkit.transforms import make_transform

TOKENS = torch.arange(16).reshape(2, 8)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Native checkpoints of several kinds, and a GPTQ-layout and a compressed-tensors one."""
    root = tmp_path_factory.mktemp("hf")
    calibration = CalibrationSpec(str(calib_file), nsamples=2, seqlen=16)
    runs = {
        "rtn": {"method": "rtn", "scheme": QuantScheme(4, 32)},
        "gptq-act-order": {"method": "gptq", "scheme": QuantScheme(4, 16, False), "calibration": calibration,
                           "g_idx": True},
        "nvfp4": {"method": "rtn", "scheme": QuantScheme(4, 16, format="nvfp4")},
        "w4a4-hadamard": {"method": "rtn", "scheme": QuantScheme(4, 16), "act_scheme": QuantScheme(4, -1),
                          "transform": make_transform("hadamard")},
        "gptq-layout": {"method": "rtn", "scheme": QuantScheme(4, 16), "layout": "gptq"},
        "compressed-tensors": {"method": "rtn", "scheme": QuantScheme(4, 16), "layout": "compressed-tensors"},
    }
    for name, arguments in runs.items():
        quantize(str(tiny_model_dir), output=root / name, **arguments)
    return {name: root / name for name in runs}


def _layers(model: torch.nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("kind", ["rtn", "gptq-act-order", "nvfp4", "w4a4-hadamard"])
def test_from_pretrained_is_quantkit_load(checkpoints: dict[str, Path], kind: str) -> None:
    """Same modules, layer settings, kernels, tensors (names, dtypes, values) and logits, bit for bit."""
    hf = AutoModelForCausalLM.from_pretrained(checkpoints[kind])
    ours = quantkit.load(checkpoints[kind])
    assert [(n, type(m)) for n, m in hf.named_modules()] == [(n, type(m)) for n, m in ours.named_modules()]
    assert isinstance(hf.config.quantization_config, QuantkitConfig)
    layers, expected = _layers(hf), _layers(ours)
    assert len(layers) == 14
    for name, layer in layers.items():
        other = expected[name]
        assert (layer.meta, layer.backend, layer.input_scheme, layer.input_transform, layer.input_clip) == (
            other.meta, other.backend, other.input_scheme, other.input_transform, other.input_clip)
        assert list(layer._kernels) == [(CPU, torch.float32)]  # prepared at load, as quantkit.load does
        assert layer.kernel_name(CPU, torch.float32) == other.kernel_name(CPU, torch.float32)
    hf_state, our_state = hf.state_dict(), ours.state_dict()
    assert list(hf_state) == list(our_state)
    for name, tensor in hf_state.items():
        assert tensor.dtype == our_state[name].dtype and torch.equal(tensor, our_state[name]), name
    with torch.no_grad():
        assert torch.equal(hf(TOKENS).logits, ours(TOKENS).logits)


def test_act_order_and_activation_maps_are_loaded(checkpoints: dict[str, Path]) -> None:
    act_order = _layers(AutoModelForCausalLM.from_pretrained(checkpoints["gptq-act-order"]))
    assert all("g_idx" in layer.tensor_names for layer in act_order.values())
    online = _layers(AutoModelForCausalLM.from_pretrained(checkpoints["w4a4-hadamard"]))
    assert any(layer.input_transform is not None for layer in online.values())
    assert all(layer.input_scheme is not None for layer in online.values())


def test_device_map_and_dtype(checkpoints: dict[str, Path]) -> None:
    """device_map="cpu" loads the same model; dtype= builds it in that dtype, kernels prepared for it, the
    stored quantized tensors in their own dtypes."""
    ours = quantkit.load(checkpoints["rtn"])
    placed = AutoModelForCausalLM.from_pretrained(checkpoints["rtn"], device_map="cpu")
    half = AutoModelForCausalLM.from_pretrained(checkpoints["rtn"], dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(placed(TOKENS).logits, ours(TOKENS).logits)
        logits = half(TOKENS).logits
        assert logits.dtype == torch.bfloat16
        torch.testing.assert_close(logits.float(), ours(TOKENS).logits, rtol=0, atol=0.05)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16
    for name, layer in _layers(half).items():
        assert list(layer._kernels) == [(CPU, torch.bfloat16)]
        assert {n: getattr(layer, n).dtype for n in layer.tensor_names} == {
            n: getattr(ours.get_submodule(name), n).dtype for n in layer.tensor_names}


@pytest.mark.parametrize(("kind", "theirs"), [("gptq-layout", GptqHfQuantizer),
                                               ("compressed-tensors", CompressedTensorsHfQuantizer)])
def test_other_layouts_stay_with_transformers(checkpoints: dict[str, Path], kind: str, theirs: type) -> None:
    method = json.loads((checkpoints[kind] / "config.json").read_text())["quantization_config"]["quant_method"]
    assert AUTO_QUANTIZER_MAPPING[method] is theirs
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is QuantkitHfQuantizer


def test_a_gptq_checkpoint_never_reaches_quantkit(checkpoints: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("quantkit's quantizer was used")

    monkeypatch.setattr(QuantkitHfQuantizer, "__init__", refuse)
    try:  # transformers' GPTQ quantizer loads it, or says what it needs (optimum)
        AutoModelForCausalLM.from_pretrained(checkpoints["gptq-layout"])
    except (ImportError, RuntimeError, ValueError) as exc:
        assert not isinstance(exc, QuantkitError)


@pytest.mark.parametrize(("damage", "message"), [
    ("truncate", r"^corrupt or truncated checkpoint file model\.safetensors: "),
    ("nan", r"^tensor model\.layers\.1\.mlp\.up_proj\.scales contains NaN or infinite values$"),
])
def test_a_damaged_checkpoint_gives_quantkits_one_line_error(checkpoints: dict[str, Path], tmp_path: Path,
                                                              damage: str, message: str) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "damaged"
    shutil.copytree(checkpoints["rtn"], folder)
    weights = folder / "model.safetensors"
    if damage == "truncate":
        os.truncate(weights, weights.stat().st_size - 100)
    else:
        tensors = load_file(weights)
        tensors["model.layers.1.mlp.up_proj.scales"][0, 0] = float("nan")
        save_file(tensors, weights, metadata={"format": "pt"})
    for load in (quantkit.load, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(QuantkitError, match=message) as info:
            load(folder)
        assert "\n" not in str(info.value)


def test_a_transformers_without_the_registry_is_refused_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, integration.REGISTRY, ModuleType(integration.REGISTRY))
    integration.register_when_imported()  # registering on import passes such a transformers by
    with pytest.raises(QuantkitError, match=r"^transformers .* has no quantizer registry \(register_quantizer\)"):
        integration.register()


def test_import_quantkit_registers_lazily_and_loading_imports_nothing_of_quantization(checkpoints) -> None:
    """``import quantkit`` imports no transformers; from_pretrained after it alone gets quantkit's layers."""
    script = (
        "import json, sys, quantkit\n"
        "lazy = 'transformers' not in sys.modules\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(checkpoints['rtn'])!r})\n"
        "layer = type(model.model.layers[0].mlp.up_proj).__name__\n"
        "print(json.dumps([lazy, layer, sorted(m for m in sys.modules if m.startswith('quantkit'))]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lazy, layer, loaded = json.loads(proc.stdout.splitlines()[-1])
    assert lazy and layer == "QuantLinear"
    assert [m for m in loaded if m.startswith(QUANTIZATION)] == []
