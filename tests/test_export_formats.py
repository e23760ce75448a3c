"""GPTQ v1 and compressed-tensors pack-quantized: layouts checked against decoders written from the specs,
export -> load round trips, refusals, conversion of existing checkpoints and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import QUANTIZE_FLAGS, assert_one_line_error, run_cli

import quantkit
from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.api import export
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.engine import quantize_model
from quantkit.errors import QuantkitError
from quantkit.export.save import save_checkpoint
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.layouts import compressed_tensors as ct
from quantkit.layouts import gptq
from quantkit.models.architectures import adapter_for
from quantkit.quantizers import make_quantizer
from quantkit.runtime.loader import is_quantkit_checkpoint
from quantkit.schemes import QuantScheme

CALIB = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------- independent decoders (from the format notes)

def _u32(x: int) -> int:
    return x & 0xFFFFFFFF


def gptq_unpack_input_dim(qweight: torch.Tensor, bits: int, n_in: int) -> list[list[int]]:
    """GPTQ qweight [words, out] -> codes [in][out]; 3 bits by AutoGPTQ's 10 + split + 10 + split + 10 rule."""
    words = [[_u32(int(v)) for v in row] for row in qweight.tolist()]
    out = len(words[0])
    codes = [[0] * out for _ in range(n_in)]
    mask = 2**bits - 1
    for col in range(out):
        if bits in (2, 4, 8):
            per = 32 // bits
            for i in range(n_in):
                codes[i][col] = (words[i // per][col] >> ((i % per) * bits)) & mask
            continue
        for block in range(-(-n_in // 32)):  # 32 values in 3 words
            w0, w1, w2 = (words[3 * block + k][col] if 3 * block + k < len(words) else 0 for k in range(3))
            vals = [(w0 >> (3 * k)) & 7 for k in range(10)]
            vals.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
            vals += [(w1 >> (3 * k + 1)) & 7 for k in range(10)]
            vals.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
            vals += [(w2 >> (3 * k + 2)) & 7 for k in range(10)]
            for k, v in enumerate(vals):
                if 32 * block + k < n_in:
                    codes[32 * block + k][col] = v
    return codes


def bitstream_unpack(words: list[int], bits: int, n: int) -> list[int]:
    """Element i at global bit i*bits of a little-endian stream of 32-bit words (compressed-tensors' dense packing)."""
    stream = sum(_u32(w) << (32 * k) for k, w in enumerate(words))
    return [(stream >> (i * bits)) & (2**bits - 1) for i in range(n)]


def random_qt(bits: int, group_size: int, symmetric: bool, act_order: bool, shape=(40, 96), seed=0) -> IntQuantizedTensor:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    scheme = QuantScheme(bits, group_size, symmetric)
    groups = scheme.num_groups(in_f)
    zeros = (torch.full((out_f, groups), 2 ** (bits - 1)) if symmetric
             else torch.randint(0, 2**bits, (out_f, groups), generator=g))
    g_idx = torch.randint(0, groups, (in_f,), generator=g).to(torch.int32) if act_order else None
    return IntQuantizedTensor(
        codes=torch.randint(0, 2**bits, shape, generator=g).to(torch.uint8),
        scales=(torch.rand(out_f, groups, generator=g) + 0.01).to(torch.float16),
        zeros=zeros.to(torch.uint8), scheme=scheme, g_idx=g_idx,
    )


@pytest.mark.parametrize("bits,group_size,act_order", [(2, 32, False), (3, 32, True), (4, 16, True), (8, -1, False), (3, 24, False)])
def test_gptq_layout_matches_an_independent_decoder(bits: int, group_size: int, act_order: bool) -> None:
    qt = random_qt(bits, group_size, True, act_order, shape=(40, 96), seed=bits)
    t = gptq.encode(qt)
    out_f, in_f = qt.shape
    groups = qt.scheme.num_groups(in_f)
    assert t["qweight"].dtype == torch.int32 and tuple(t["qweight"].shape) == (-(-in_f * bits // 32), out_f)
    assert tuple(t["qzeros"].shape) == (groups, -(-out_f * bits // 32)) and t["scales"].shape == (groups, out_f)
    codes = gptq_unpack_input_dim(t["qweight"], bits, in_f)
    assert torch.equal(torch.tensor(codes).t(), qt.codes.long())
    # qzeros: packed along the output dim, v1 stores zero - 1
    for g in range(groups):
        stored = bitstream_unpack(t["qzeros"][g].tolist(), bits, out_f)
        assert [s + 1 for s in stored] == qt.zeros[:, g].tolist()
    if bits == 4:
        assert int(t["qzeros"][0, 0]) == 0x77777777  # symmetric 4-bit: every v1 nibble is 7
    expected_g_idx = qt.g_idx if act_order else torch.arange(in_f) // (in_f if group_size == -1 else group_size)
    assert torch.equal(t["g_idx"].long(), expected_g_idx.long())
    assert torch.equal(t["scales"], qt.scales.t())
    back = gptq.decode(t, qt.scheme, qt.shape, v1=True)
    assert torch.equal(back.dequantize(), qt.dequantize())


def test_gptq_refuses_asymmetric_and_reads_v2_zeros() -> None:
    qt = random_qt(4, 16, False, False)
    with pytest.raises(QuantkitError, match="asymmetric"):
        gptq.check_scheme(qt.scheme)
    t = gptq.encode(random_qt(4, 16, True, False))
    v2 = dict(t, qzeros=t["qzeros"] + 0x11111111)  # GPTQModel's v1 -> v2 conversion: +1 in every nibble
    a = gptq.decode(t, QuantScheme(4, 16), (40, 96), v1=True)
    b = gptq.decode(v2, QuantScheme(4, 16), (40, 96), v1=False)
    assert torch.equal(a.zeros, b.zeros) and int(a.zeros[0, 0]) == 8


@pytest.mark.parametrize("bits,group_size,symmetric,act_order", [(4, 16, True, True), (4, 32, False, False), (2, 16, False, True), (8, -1, True, False), (8, 32, False, False)])
def test_compressed_tensors_layout_matches_an_independent_decoder(bits: int, group_size: int, symmetric: bool, act_order: bool) -> None:
    qt = random_qt(bits, group_size, symmetric, act_order, shape=(40, 96), seed=bits + 10)
    if act_order:
        # compressed-tensors >= 0.20 refuses actorder "group"; older files with weight_g_idx still load.
        with pytest.raises(QuantkitError, match="act-order"):
            ct.encode(qt, torch.float32)
        t = {**ct.encode(dataclasses.replace(qt, g_idx=None), torch.float32), "weight_g_idx": qt.g_idx}
    else:
        t = ct.encode(qt, torch.float32)
    out_f, in_f = qt.shape
    groups = qt.scheme.num_groups(in_f)
    assert tuple(t["weight_packed"].shape) == (out_f, -(-in_f * bits // 32)) and t["weight_packed"].dtype == torch.int32
    offset = 2 ** (bits - 1)
    for row in range(out_f):
        stored = bitstream_unpack(t["weight_packed"][row].tolist(), bits, in_f)
        signed = [s - offset for s in stored]  # the value compressed-tensors quantized, in [-2^(b-1), 2^(b-1))
        zero_signed = [0] * groups if symmetric else [z - offset for z in qt.zeros[row].tolist()]
        g = qt.group_index().tolist()
        assert [q - zero_signed[g[i]] for i, q in enumerate(signed)] == (qt.codes[row].long() - qt.zeros[row].long()[g]).tolist()
    assert t["weight_shape"].tolist() == [out_f, in_f] and t["weight_shape"].dtype == torch.int64
    assert t["weight_scale"].dtype == torch.float32 and torch.equal(t["weight_scale"], qt.scales.float())
    assert ("weight_zero_point" in t) == (not symmetric)
    if not symmetric:
        zp = t["weight_zero_point"]
        assert tuple(zp.shape) == (-(-out_f * bits // 32), groups)
        for g in range(groups):  # packed along dim 0
            assert bitstream_unpack(zp[:, g].tolist(), bits, out_f) == qt.zeros[:, g].tolist()
    assert ("weight_g_idx" in t) == act_order
    args = ct.WeightArgs(bits, group_size, symmetric, act_order)
    assert torch.equal(ct.decode(t, args, qt.shape).dequantize(), qt.dequantize())


def test_compressed_tensors_refuses_3_bits() -> None:
    with pytest.raises(QuantkitError, match="3-bit"):
        ct.check_scheme(QuantScheme(3, 32, True))


# ---------------------------------------------------------------- whole checkpoints

def quantize_tiny(method: str, scheme: QuantScheme, **options) -> tuple[torch.nn.Module, dict]:
    model = tiny_model()
    quantized = quantize_model(model, adapter_for("llama"), make_quantizer(method, **options), lambda _: scheme, CALIB)
    return model, quantized


def _config(method: str, options: dict) -> dict:
    return {"method": method, "quantizer": options, "calibration": {"true_sequential": True}}


ROUND_TRIPS = [
    ("gptq", "rtn", QuantScheme(4, 16, True), {}),
    ("gptq", "gptq", QuantScheme(4, 16, True), {"act_order": True, "g_idx": True}),
    ("gptq", "gptq", QuantScheme(3, 32, True), {"act_order": True}),
    ("gptq", "gptq", QuantScheme(8, -1, True), {"act_order": False}),
    ("compressed-tensors", "rtn", QuantScheme(4, 16, False), {}),
    ("compressed-tensors", "gptq", QuantScheme(4, 16, True), {"act_order": True, "static_groups": True}),
    ("compressed-tensors", "gptq", QuantScheme(2, 32, False), {"act_order": True, "static_groups": True}),
    ("compressed-tensors", "gptq", QuantScheme(8, -1, True), {"act_order": False}),
]


@pytest.mark.parametrize("fmt,method,scheme,options", ROUND_TRIPS)
def test_exported_checkpoint_loads_to_the_fake_quant_logits(tmp_path: Path, fmt: str, method: str, scheme: QuantScheme, options: dict) -> None:
    model, quantized = quantize_tiny(method, scheme, **options)
    save_checkpoint(fmt, tmp_path / "ckpt", model, tiny_tokenizer(), quantized, _config(method, options))
    assert is_quantkit_checkpoint(tmp_path / "ckpt")
    loaded = quantkit.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-6)
    for name, qt in quantized.items():
        assert torch.equal(loaded.get_submodule(name).quantized().dequantize(), qt.dequantize())
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float32
    qc = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    if fmt == "gptq":
        assert qc["quant_method"] == "gptq" and qc["checkpoint_format"] == "gptq" and qc["sym"] is True
        assert qc["bits"] == scheme.bits and qc["group_size"] == scheme.group_size and qc["lm_head"] is False
        assert qc["desc_act"] == bool(options.get("g_idx")) and qc["meta"]["quantizer"][0].startswith("quantkit:")
        assert json.loads((tmp_path / "ckpt" / "quantize_config.json").read_text()) == qc
        assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (-(-160 * scheme.bits // 32), 64)
    else:
        assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
        assert qc["ignore"] == ["lm_head"] and qc["quantization_status"] == "compressed"
        weights = qc["config_groups"]["group_0"]["weights"]
        assert weights["num_bits"] == scheme.bits and weights["symmetric"] == scheme.symmetric
        assert weights["strategy"] == ("channel" if scheme.group_size == -1 else "group")
        assert tensors["model.layers.0.mlp.down_proj.weight_scale"].dtype == torch.float32  # model dtype
    info = inspect_checkpoint(tmp_path / "ckpt")
    assert info.quantized_weights == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160)


def test_gptq_v2_and_quantize_config_only_checkpoints_load(tmp_path: Path) -> None:
    model, quantized = quantize_tiny("gptq", QuantScheme(4, 16, True), g_idx=True)
    folder = tmp_path / "ckpt"
    save_checkpoint("gptq", folder, model, tiny_tokenizer(), quantized, _config("gptq", {"g_idx": True}))
    tensors = load_file(str(folder / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(".qzeros")]:
        tensors[name] = tensors[name] + 0x11111111  # v1 -> v2: +1 in every 4-bit field
    save_file(tensors, str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    qc = config.pop("quantization_config")  # only quantize_config.json describes the quantization
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "quantize_config.json").write_text(json.dumps({**qc, "checkpoint_format": "gptq_v2", "format": "gptq_v2"}))
    loaded = quantkit.load(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gptq") / "ckpt"
    model, quantized = quantize_tiny("rtn", QuantScheme(4, 16, True))
    save_checkpoint("gptq", folder, model, tiny_tokenizer(), quantized, _config("rtn", {}))
    return folder


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("model.layers.0.mlp.up_proj.qzeros"), "missing 1 tensor"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.qzeros": torch.zeros(4, 20, dtype=torch.int64)}), "qzeros has shape"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.g_idx": torch.full((64,), 7, dtype=torch.int32)}), "outside"),
        (lambda t: t.update({"model.norm.weight": torch.full((64,), float("nan"))}), "NaN"),
    ],
)
def test_damaged_gptq_checkpoint_fails_with_one_line(tmp_path: Path, gptq_checkpoint: Path, edit, message: str) -> None:
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(gptq_checkpoint, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(QuantkitError, match=message) as info:
        quantkit.load(folder)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda qc: qc.update(checkpoint_format="marlin", format="marlin"), "checkpoint_format 'marlin'"),
        (lambda qc: qc.update(bits=5), "bit width 5"),
        (lambda qc: qc.update(dynamic={"+:.*(down_proj": {"bits": 8}}), "not a valid regular expression"),
    ],
)
def test_unsupported_gptq_configs_are_refused(tmp_path: Path, gptq_checkpoint: Path, edit, message: str) -> None:
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(gptq_checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match=message):
        quantkit.load(folder)


def test_pickle_weights_are_refused(tmp_path: Path, gptq_checkpoint: Path) -> None:
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(gptq_checkpoint, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(QuantkitError, match="pickle"):
        quantkit.load(folder)


def test_refusals_leave_no_output(tmp_path: Path, tiny_model_dir: Path) -> None:
    # the scheme is refused before the model is even looked at
    with pytest.raises(QuantkitError, match="asymmetric"):
        quantkit.quantize(str(tmp_path / "no-such-model"), method="rtn", scheme=QuantScheme(4, 16, False),
                          output=tmp_path / "a", layout="gptq")
    with pytest.raises(QuantkitError, match="3-bit"):
        quantkit.quantize(str(tmp_path / "no-such-model"), method="rtn", scheme=QuantScheme(3, 16, True),
                          output=tmp_path / "b", layout="compressed-tensors")
    with pytest.raises(QuantkitError, match="act-order"):
        quantkit.quantize(str(tmp_path / "no-such-model"), method="gptq", g_idx=True, output=tmp_path / "f",
                          layout="compressed-tensors")
    with pytest.raises(QuantkitError, match="unknown checkpoint layout 'awq'"):
        quantkit.quantize(str(tiny_model_dir), method="rtn", output=tmp_path / "c", layout="awq")
    # 64 columns do not split into groups of 24: refused after loading, before quantizing
    with pytest.raises(QuantkitError, match="divisible by the group size"):
        quantkit.quantize(str(tiny_model_dir), method="rtn", scheme=QuantScheme(4, 24, True),
                          output=tmp_path / "d", layout="compressed-tensors")
    # converting an asymmetric native checkpoint to GPTQ
    model, quantized = quantize_tiny("rtn", QuantScheme(4, 16, False))
    save_checkpoint("native", tmp_path / "native", model, tiny_tokenizer(), quantized, _config("rtn", {}))
    with pytest.raises(QuantkitError, match="asymmetric"):
        export(tmp_path / "native", tmp_path / "e", "gptq")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["native"]


@pytest.mark.parametrize("order", [{"static_groups": True}, {"g_idx": True}, {}])
def test_convert_between_formats_keeps_the_weights(tmp_path: Path, order: dict) -> None:
    options = {"act_order": True, **order}
    model, quantized = quantize_tiny("gptq", QuantScheme(4, 16, True), **options)
    save_checkpoint("native", tmp_path / "native", model, tiny_tokenizer(), quantized, _config("gptq", options))
    if order.get("g_idx"):  # act-order groups (g_idx): GPTQ holds them, current compressed-tensors does not
        with pytest.raises(QuantkitError, match="act-order"):
            export(tmp_path / "native", tmp_path / "ct", "compressed-tensors")
        assert not (tmp_path / "ct").exists()
        export(tmp_path / "native", tmp_path / "ct", "gptq")
    else:
        export(tmp_path / "native", tmp_path / "ct", "compressed-tensors")
    export(tmp_path / "ct", tmp_path / "gptq", "gptq")
    export(tmp_path / "gptq", tmp_path / "back", "native")
    loaded = quantkit.load(tmp_path / "back")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-6)
    assert quantkit.load_tokenizer(tmp_path / "back") is not None


# ---------------------------------------------------------------- command line

def test_cli_format_and_export(tmp_path: Path, tiny_model_dir: Path, calib_file: Path) -> None:
    out = tmp_path / "w4-gptq"
    proc = run_cli("quantize", str(tiny_model_dir), *QUANTIZE_FLAGS, "--static-groups", "--calib", str(calib_file), "-o", str(out),
                   "--layout", "gptq")
    assert proc.returncode == 0, proc.stderr
    assert (out / "quantize_config.json").is_file()
    proc = run_cli("export", str(out), "-o", str(tmp_path / "ct"), "--layout", "compressed-tensors")
    assert proc.returncode == 0, proc.stderr
    a, b = quantkit.load(out), quantkit.load(tmp_path / "ct")
    with torch.no_grad():
        torch.testing.assert_close(a(CALIB).logits, b(CALIB).logits, rtol=0, atol=0)
    inspect = run_cli("inspect", str(tmp_path / "ct"), "--json")
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["schemes"][0]["scheme"] == "int w4 g16 sym"
    assert_one_line_error(run_cli("export", str(out), "-o", str(tmp_path / "x"), "--layout", "awq"),
                          "'--layout': 'awq' is not one of 'native', 'gptq', 'compressed-tensors'")
    assert_one_line_error(
        run_cli("quantize", str(tiny_model_dir), "--method", "rtn", "--asym", "-o", str(tmp_path / "y"), "--layout", "gptq"),
        "asymmetric",
    )
    assert_one_line_error(
        run_cli("quantize", str(tiny_model_dir), *QUANTIZE_FLAGS, "--g-idx", "-o", str(tmp_path / "z"), "--layout",
                "compressed-tensors"),
        "act-order",
    )
    assert not any((tmp_path / name).exists() for name in ("x", "y", "z"))


# ---------------------------------------------------------------- third-party readers

def test_compressed_tensors_and_transformers_read_our_checkpoint(tmp_path: Path) -> None:
    """compressed-tensors' own decompressor and transformers' integration (the ``test`` extra installs it)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from transformers import AutoModelForCausalLM

    # compressed-tensors >= 0.20 no longer accepts actorder "group" (g_idx); static groups keep act-order's accuracy
    model, quantized = quantize_tiny("gptq", QuantScheme(4, 16, False), act_order=True, static_groups=True)
    save_checkpoint("compressed-tensors", tmp_path / "ct", model, tiny_tokenizer(), quantized, _config("gptq", {}))
    qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme(**{k: qc["config_groups"]["group_0"][k] for k in ("targets", "weights")})
    tensors = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, qt in quantized.items():
        state = {k.rpartition(".")[2]: v for k, v in tensors.items() if k.startswith(f"{name}.")}
        dense = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(dense, qt.dequantize(dense.dtype))
    try:
        from transformers.utils.quantization_config import CompressedTensorsConfig
    except ImportError:
        pytest.skip("this transformers has no compressed-tensors integration")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ct"), quantization_config=CompressedTensorsConfig(run_compressed=False))
    with torch.no_grad():
        torch.testing.assert_close(hf(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-6)
