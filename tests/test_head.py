"""--quantize-head: the output head rounded to int8 or int4 after the decoder, untied from the embeddings, and
carried by every checkpoint layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import quantkit
from quantkit.api import export, quantize
from quantkit.cli import app
from quantkit.errors import OptionError, QuantkitError
from quantkit.head import head_scheme
from quantkit.quantizers import LayerStats, make_quantizer
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme

W4 = QuantScheme(4, 32, True)
IDS = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))


def test_head_schemes() -> None:
    assert head_scheme("int8", W4) == QuantScheme(8, -1, True)
    assert head_scheme("int4", W4) == QuantScheme(4, 32, True)
    assert head_scheme("int4", QuantScheme(4, -1, False)) == QuantScheme(4, 128, True)


@pytest.mark.parametrize("name,bits", [("int8", 8), ("int4", 4)])
def test_quantized_head_is_rtn_of_the_tied_embeddings_and_round_trips(tiny_model_dir: Path, tmp_path: Path,
                                                                      name: str, bits: int) -> None:
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tied = source.get_input_embeddings().weight.detach().clone()
    result = quantize(str(tiny_model_dir), "rtn", W4, output=tmp_path / "native", quantize_head=name)
    head = result.quantized["lm_head"]
    assert head.scheme == head_scheme(name, W4) and head.scheme.bits == bits
    expected = make_quantizer("rtn").quantize(tied, LayerStats(), head.scheme).dequantize()
    torch.testing.assert_close(result.model.lm_head.weight, expected, rtol=0, atol=0)
    assert torch.equal(result.model.get_input_embeddings().weight, tied)  # the embeddings stay float
    assert result.quantization_config["head"] == head.scheme.to_dict()
    with torch.no_grad():
        fake = result.model(IDS).logits
    for layout in ("native", "gptq", "compressed-tensors"):
        folder = tmp_path / layout
        if layout != "native":
            export(tmp_path / "native", folder, layout=layout)
        loaded = quantkit.load(folder)
        assert isinstance(loaded.lm_head, QuantLinear) and not loaded.config.tie_word_embeddings
        assert torch.equal(loaded.get_input_embeddings().weight, tied)
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, fake, rtol=0, atol=1e-4, msg=layout)


def test_gptq_config_marks_the_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    import json

    quantize(str(tiny_model_dir), "rtn", W4, output=tmp_path / "gptq", layout="gptq", quantize_head="int8")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["lm_head"] is True
    assert config["dynamic"] == {"+:^(?:lm_head)$": {"bits": 8, "group_size": -1}}


def test_gguf_export_carries_the_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    from quantkit.models.loading import load_model

    result = quantize(str(tiny_model_dir), "rtn", W4, output=tmp_path / "native", quantize_head="int8")
    export(tmp_path / "native", tmp_path / "model.gguf", layout="gguf")
    read = load_model(str(tmp_path / "model.gguf")).model  # dequantized by quantkit's GGUF reader
    # q8_0 keeps each row's scale in every block of 32, rounded to float16
    torch.testing.assert_close(read.lm_head.weight, result.model.lm_head.weight, rtol=1e-3, atol=1e-5)


def test_refusals(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(OptionError, match="int8 or int4"):
        quantize(str(tiny_model_dir), "rtn", W4, quantize_head="int3")
    with pytest.raises(OptionError, match="weight-only"):
        quantize(str(tiny_model_dir), "rtn", W4, act_scheme=QuantScheme(8, -1, True), quantize_head="int8")
    with pytest.raises(QuantkitError, match="quantize-head"):
        quantize(str(tiny_model_dir), "rtn", W4, output=tmp_path / "out", offload="disk", quantize_head="int8")
    assert not (tmp_path / "out").exists()


def test_cli_option(tiny_model_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "cli"
    ok = runner.invoke(app, ["quantize", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                             "--quantize-head", "int4", "-o", str(out)])
    assert ok.exit_code == 0, ok.output
    assert "output head" in ok.output
    assert isinstance(quantkit.load(out).lm_head, QuantLinear)
    bad = runner.invoke(app, ["quantize", str(tiny_model_dir), "--quantize-head", "fp3", "-o", str(tmp_path / "bad")])
    assert bad.exit_code != 0 and not (tmp_path / "bad").exists()
