"""GGUF: the block formats against gguf-py's own dequantizer, and whole files read back by transformers' GGUF
loader (an independent reader that undoes llama.cpp's rotary row order and dequantizes with gguf-py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import quantkit
from conftest import CALIBRATION_TEXT, saved_with_tokenizer, tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.api import export, quantize_run
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.errors import QuantkitError
from quantkit.hessian import HessianAccumulator
from quantkit.layouts.gguf_blocks import block_bytes
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import LayerStats
from quantkit.runplan import CalibrationSpec, plan_run
from quantkit.schemes import QuantScheme

FORMATS = ("q8_0", "q5_0", "q4_0", "q4_k")
GGML = {"q8_0": GGMLQuantizationType.Q8_0, "q5_0": GGMLQuantizationType.Q5_0, "q4_0": GGMLQuantizationType.Q4_0,
        "q4_k": GGMLQuantizationType.Q4_K}


def gguf_scheme(fmt: str) -> QuantScheme:
    return QuantScheme.for_format(fmt, None, None, None, 128, True)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block Llama whose rows are multiples of 256 (q4_k's super-block), with a byte-level tokenizer."""
    config = AutoConfig.for_model("llama", vocab_size=320, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return saved_with_tokenizer(AutoModelForCausalLM.from_config(config), tmp_path_factory.mktemp("wide-llama"))


@pytest.fixture(scope="module")
def calib_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIBRATION_TEXT)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
def test_blocks_decode_with_gguf_py_to_quantkit_weights(fmt: str) -> None:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 512, generator=gen) * 0.05
    w[0, :32] = 0  # an all-zero block
    w[1, 40] = -1.0  # a block whose extreme is negative
    qt = make_quantizer("rtn").quantize(w, LayerStats(), gguf_scheme(fmt))
    data = block_bytes(qt)
    np.testing.assert_array_equal(dequantize(data, GGML[fmt]), qt.dequantize().numpy())
    assert np.abs(qt.dequantize().numpy() - w.numpy()).max() < 0.2 * float(w.abs().max())


def test_legacy_formats_put_the_extreme_on_the_grid_end() -> None:
    w = torch.tensor([[0.5, -0.1, 0.3, -2.0] * 8])
    qt = make_quantizer("rtn").quantize(w, LayerStats(), gguf_scheme("q4_0"))
    assert qt.codes[0, 3] == 0 and float(qt.dequantize()[0, 3]) == -2.0  # d = -2 / -8, code 0 is -8 d


def test_native_storage_round_trips() -> None:
    w = torch.randn(4, 256)
    for fmt in FORMATS:
        qt = make_quantizer("rtn").quantize(w, LayerStats(), gguf_scheme(fmt))
        again = type(qt).from_tensors(qt.to_tensors(), qt.meta(), qt.shape)
        assert torch.equal(again.dequantize(), qt.dequantize())


@pytest.mark.parametrize("fmt", ["q4_0", "q4_k"])
def test_gptq_on_gguf_grids_beats_rtn(fmt: str) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 256, generator=gen) @ (torch.randn(256, 256, generator=gen) / 16)
    acc = HessianAccumulator(256)
    acc.add(x)
    w = torch.randn(32, 256, generator=gen) * 0.02
    scheme = gguf_scheme(fmt)

    def error(q: torch.Tensor) -> float:
        return float(((x.double() @ (w - q).double().T) ** 2).sum())

    rtn = make_quantizer("rtn").quantize(w, LayerStats(), scheme)
    gptq = make_quantizer("gptq").quantize(w, LayerStats(acc.hessian(), acc.tokens), scheme)
    assert error(gptq.dequantize()) < 0.7 * error(rtn.dequantize())
    np.testing.assert_array_equal(dequantize(block_bytes(gptq), GGML[fmt]), gptq.dequantize().numpy())


def read_back(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("method,fmt", [("rtn", "q8_0"), ("rtn", "q4_0"), ("rtn", "q5_0"), ("rtn", "q4_k"),
                                        ("gptq", "q4_k")])
def test_quantized_file_reads_back_as_the_quantized_model(tmp_path: Path, wide_model_dir: Path, calib_path: Path,
                                                          method: str, fmt: str) -> None:
    output = tmp_path / f"{fmt}.gguf"
    run = plan_run(method, number_format=fmt, layout="gguf", calibration=CalibrationSpec(str(calib_path), 4, 64))
    result = quantize_run(str(wide_model_dir), run, output=output)
    embeddings = result.model.get_input_embeddings().weight
    embeddings.data = embeddings.data.half().float()  # the file keeps unquantized matrices in float16
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(read_back(output)(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)
    types = {t.name: t.tensor_type for t in GGUFReader(output).tensors}
    assert types["blk.0.attn_q.weight"] == GGML[fmt] and types["blk.1.ffn_down.weight"] == GGML[fmt]
    assert types["token_embd.weight"] == GGMLQuantizationType.F16 and "output.weight" not in types  # tied head


def test_q4_k_falls_back_to_q5_0_on_rows_a_super_block_does_not_divide(tmp_path: Path, tiny_model_dir: Path) -> None:
    output = tmp_path / "tiny.gguf"
    quantize_run(str(tiny_model_dir), plan_run("rtn", number_format="q4_k", layout="gguf"), output=output)
    types = {t.name: t.tensor_type for t in GGUFReader(output).tensors}
    assert types["blk.0.attn_q.weight"] == GGMLQuantizationType.Q5_0  # 64 inputs
    assert types["blk.0.ffn_down.weight"] == GGMLQuantizationType.Q5_0  # 160 inputs


def test_float_export_carries_weights_and_tokenizer(tmp_path: Path, tiny_model_dir: Path) -> None:
    output = tmp_path / "tiny-f16.gguf"
    export(str(tiny_model_dir), output, "gguf", gguf_type="f16")
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        torch.testing.assert_close(read_back(output)(ids).logits, reference, rtol=0, atol=2e-3)
    text = "Sentence 12 says 3 weights fit."
    gguf_tokenizer = AutoTokenizer.from_pretrained(output.parent, gguf_file=output.name)
    assert gguf_tokenizer(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"]


def test_export_of_a_native_gguf_checkpoint_equals_the_direct_file(tmp_path: Path, wide_model_dir: Path) -> None:
    direct, native, exported = tmp_path / "direct.gguf", tmp_path / "native", tmp_path / "exported.gguf"
    quantize_run(str(wide_model_dir), plan_run("rtn", number_format="q4_k", layout="gguf"), output=direct)
    quantize_run(str(wide_model_dir), plan_run("rtn", number_format="q4_k"), output=native)
    export(native, exported, "gguf", gguf_type="q4_k")
    ours, theirs = GGUFReader(direct).tensors, GGUFReader(exported).tensors
    assert [t.name for t in ours] == [t.name for t in theirs]
    for a, b in zip(ours, theirs):
        assert a.tensor_type == b.tensor_type and np.array_equal(a.data, b.data), a.name


@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, -1)])
def test_symmetric_int_checkpoints_export_exactly(tmp_path: Path, wide_model_dir: Path, bits: int,
                                                  group_size: int) -> None:
    native, output = tmp_path / "native", tmp_path / "int.gguf"
    quantize_run(str(wide_model_dir), plan_run("rtn", bits=bits, group_size=group_size), output=native)
    export(native, output, "gguf")
    expected = GGML["q4_0" if bits == 4 else "q8_0"]
    assert {t.name: t.tensor_type for t in GGUFReader(output).tensors}["blk.0.attn_q.weight"] == expected
    loaded = quantkit.load(native, kernel="dequant")
    embeddings = loaded.get_input_embeddings().weight
    embeddings.data = embeddings.data.half().float()
    ids = torch.randint(0, 320, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(read_back(output)(ids).logits, loaded(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(QuantkitError, match="holds q[48]_0 layers"):
        export(native, tmp_path / "other.gguf", "gguf", gguf_type="q4_k")


def test_refusals(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(QuantkitError, match="holds GGUF's block formats"):
        plan_run("rtn", number_format="int", symmetric=False, layout="gguf")
    with pytest.raises(QuantkitError, match="unknown GGUF type"):
        export(str(tiny_model_dir), tmp_path / "x.gguf", "gguf", gguf_type="q3_k")
    with pytest.raises(QuantkitError, match="quantize it with --layout gguf --gguf-type q4_k"):
        export(str(tiny_model_dir), tmp_path / "x.gguf", "gguf", gguf_type="q4_k")
    native = tmp_path / "int"
    quantize_run(str(tiny_model_dir), plan_run("rtn", bits=4, group_size=16), output=native)
    with pytest.raises(QuantkitError, match="not int w4 g16"):
        export(native, tmp_path / "y.gguf", "gguf")
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(QuantkitError, match="is a directory"):
        export(str(tiny_model_dir), tmp_path / "dir.gguf", "gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.gguf", "int"]  # nothing half-written


def test_inspect_counts_a_gguf_file(tmp_path: Path, wide_model_dir: Path) -> None:
    output = tmp_path / "model.q8"  # any name: a file is read as GGUF
    quantize_run(str(wide_model_dir), plan_run("rtn", number_format="q8_0", layout="gguf"), output=output)
    info = inspect_checkpoint(output)
    assert [s.scheme for s in info.schemes] == ["q8_0"] and info.total.layers == 14
    assert info.bits_per_weight == pytest.approx(8.5)  # 32 one-byte codes and a float16 scale per block
    assert info.file_bytes == output.stat().st_size and info.quantization_config["general.file_type"] == 7
    (tmp_path / "junk").write_text("not a model")
    with pytest.raises(QuantkitError, match="neither a checkpoint directory nor a GGUF file"):
        inspect_checkpoint(tmp_path / "junk")
