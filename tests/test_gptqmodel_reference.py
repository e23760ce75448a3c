"""GPTQModel 7.7 (a third-party GPTQ quantizer in its own venv) through scripts/gptqmodel_reference.py and the
runner, on a tiny random Llama: its GPTQ checkpoint must load in quantkit with weights close to the float ones.

Marked `runtimes` like tests/test_runtimes.py: skipped (with the reason) when the GPTQModel venv under
~/.cache/quantkit/runtimes is absent; `QUANTKIT_RUNTIMES=build pytest -m runtimes` builds it first.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from helpers_tokenizer import tiny_tokenizer

sys.path.insert(0, str(REPO / "scripts"))
from runtime_envs import BUILD_ENV, GPTQMODEL_VERSION, Runtime, RuntimeUnavailable, ensure  # noqa: E402

# 4-bit symmetric groups of 64 on Gaussian weights: round to nearest alone leaves ~0.1 of the weights' norm;
# GPTQ trades weight error for output error, so its weights sit a little further (~0.13 here)
MAX_REL_ERROR = 0.2


def gptqmodel_runtime() -> Runtime:
    """GPTQModel's environment; skipped when absent unless $QUANTKIT_RUNTIMES=build (then built, or failed)."""
    if os.environ.get(BUILD_ENV) == "build":
        return ensure("gptqmodel", build=True)
    try:
        return ensure("gptqmodel", build=False)
    except RuntimeUnavailable as error:
        pytest.skip(f"{error}; build it with `{BUILD_ENV}=build pytest -m runtimes` or "
                    "`python scripts/gptqmodel_reference.py` (which builds it)")


def tiny_llama(folder: Path) -> Path:
    """A random 2-block Llama whose linears all split into groups of 64, with the tiny tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                                  tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def unpack_int4(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words holding eight 4-bit values each (lowest bits first) unpacked along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    values = (packed.unsqueeze(dim + 1) >> shifts.view([-1 if d == dim + 1 else 1 for d in range(packed.dim() + 1)])) & 0xF
    return values.flatten(dim, dim + 1)


def gptq_v1_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every GPTQ linear's weight [out, in] decoded straight from the safetensors (v1: stored zero = zero - 1),
    without quantkit's reader."""
    from safetensors.torch import load_file

    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    weights = {}
    for key in tensors:
        if key.endswith(".qweight"):
            name = key.removesuffix(".qweight")
            q = unpack_int4(tensors[key], 0)  # [in, out]
            zeros = unpack_int4(tensors[f"{name}.qzeros"], 1) + 1  # [groups, out]
            scales, g_idx = tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].long()
            weights[name] = (scales[g_idx] * (q - zeros[g_idx]).float()).T
    return weights


@pytest.mark.runtimes
def test_gptqmodel_checkpoint_loads_in_quantkit(tmp_path: Path) -> None:
    """GPTQModel quantizes a tiny Llama on the CPU (W4 g64 sym, desc_act); quantkit.load reads the checkpoint
    with exactly the weights its tensors hold, and those are within the 4-bit error of the float weights."""
    from gptqmodel_reference import gptqmodel_quantize
    from transformers import AutoModelForCausalLM

    import quantkit
    from quantkit.runtime.quant_linear import QuantLinear

    runtime = gptqmodel_runtime()
    float_dir = tiny_llama(tmp_path / "float")
    windows = torch.randint(0, 320, (8, 64), generator=torch.Generator().manual_seed(0))
    output = tmp_path / "gptqmodel"
    result = gptqmodel_quantize(float_dir, windows, bits=4, group_size=64, sym=True, desc_act=True, output=output,
                                runtime=runtime, timeout=900, log=tmp_path / "gptqmodel.log")

    assert result["versions"]["gptqmodel"] == GPTQMODEL_VERSION and "+cpu" in result["versions"]["torch"]
    assert result["quantize_s"] > 0 and result["load_s"] > 0 and result["save_s"] > 0
    assert result["threads"] == (os.cpu_count() or 1) and result["windows"] == [8, 64] and result["cpu"]
    config = json.loads((output / "quantize_config.json").read_text())
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (4, 64, True, True)
    assert config["checkpoint_format"] == "gptq"

    stored = gptq_v1_weights(output)
    reference = dict(AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32).named_modules())
    loaded = quantkit.load(str(output))
    layers = {name: layer for name, layer in loaded.named_modules() if isinstance(layer, QuantLinear)}
    assert sorted(layers) == sorted(stored) and len(layers) == 14
    for name, layer in layers.items():
        weight = layer.quantized().dequantize(torch.float32)
        torch.testing.assert_close(weight, stored[name], rtol=0, atol=1e-6, msg=f"{name}: quantkit reads other weights")
        target = reference[name].weight
        error = ((weight - target).norm() / target.norm()).item()
        assert 0 < error < MAX_REL_ERROR, f"{name}: relative weight error {error:.3f}"
