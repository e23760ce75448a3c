"""Export -> load round trips, bits-per-weight accounting, and refusal of damaged checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import quantkit
from conftest import tiny_model
from helpers_tokenizer import tiny_tokenizer
from quantkit.checkpoint_info import inspect_checkpoint
from quantkit.engine import quantize_model
from quantkit.errors import QuantkitError
from quantkit.export.save import save_checkpoint
from quantkit.models.architectures import adapter_for
from quantkit.quantizers import make_quantizer
from quantkit.schemes import QuantScheme

CALIB = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(3))


def quantized_checkpoint(folder: Path, scheme: QuantScheme, **options) -> torch.nn.Module:
    model = tiny_model()
    quantized = quantize_model(model, adapter_for("llama"), make_quantizer("gptq", **options), lambda _: scheme, CALIB)
    save_checkpoint("native", folder, model, tiny_tokenizer(), quantized, {"method": "gptq", "scheme": scheme.to_dict()})
    return model


@pytest.mark.parametrize(
    "scheme,options",
    [
        (QuantScheme(4, 16, True), {"act_order": True}),
        (QuantScheme(3, 24, False), {"act_order": True}),  # partial last group (64 = 2*24 + 16)
        (QuantScheme(2, 32, True), {"act_order": True, "static_groups": True}),
        (QuantScheme(8, -1, False), {"act_order": False}),
    ],
)
def test_loaded_checkpoint_gives_the_fake_quant_logits(tmp_path: Path, scheme: QuantScheme, options: dict) -> None:
    fake = quantized_checkpoint(tmp_path / "ckpt", scheme, **options)
    loaded = quantkit.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, fake(CALIB).logits, rtol=0, atol=1e-6)
    layer = loaded.get_submodule("model.layers.0.self_attn.q_proj")
    assert type(layer).__name__ == "QuantLinear"
    assert ("g_idx" in layer.tensor_names) == options.get("g_idx", False)


def test_bits_per_weight_matches_an_independent_byte_count(tmp_path: Path) -> None:
    quantized_checkpoint(tmp_path / "ckpt", QuantScheme(4, 16, True), g_idx=True)
    info = inspect_checkpoint(tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    quant_suffixes = (".qweight", ".scales", ".qzeros", ".g_idx")
    quant_bytes = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.endswith(quant_suffixes))
    weights = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 160)  # (q, o) + (k, v) + (gate, up, down), 2 blocks
    assert info.quantized_weights == weights
    assert info.quantized_bytes == quant_bytes
    assert info.bits_per_weight == pytest.approx(8 * quant_bytes / weights)
    # codes 4 bits + fp16 scale and 4-bit zero per 16 weights + an int32 g_idx per input column
    assert 4 + 20 / 16 < info.bits_per_weight < 4 + 20 / 16 + 1


def test_non_quantized_tensors_keep_their_dtype_and_tied_head_is_stored_once(tmp_path: Path) -> None:
    quantized_checkpoint(tmp_path / "ckpt", QuantScheme(4, 16, True))
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert "lm_head.weight" not in tensors
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["layers"]["model.layers.1.mlp.down_proj"]["shape"] == [64, 160]


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    model = tiny_model()
    quantized = quantize_model(model, adapter_for("llama"), make_quantizer("rtn"), lambda _: QuantScheme(4, 16, True), None)
    save_checkpoint("native", tmp_path / "ckpt", model, None, quantized, {"method": "rtn"}, max_shard_bytes=20_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    loaded = quantkit.load(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-6)


@pytest.fixture()
def checkpoint(tmp_path: Path) -> Path:
    quantized_checkpoint(tmp_path / "ckpt", QuantScheme(4, 16, True))
    return tmp_path / "ckpt"


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]), "corrupt or truncated"),
        (lambda f: f.write_bytes(b"\x00" * 64), "corrupt or truncated"),
        (lambda f: f.unlink(), "no model.safetensors"),
        (lambda f: _rewrite(f, lambda t: t.pop("model.layers.0.mlp.up_proj.qweight")), "missing 1 tensor"),
        (lambda f: _rewrite(f, lambda t: t.update(extra=torch.zeros(1))), "unexpected tensor"),
        (lambda f: _rewrite(f, lambda t: t.update({"model.layers.0.mlp.up_proj.scales": torch.zeros(160, 3, dtype=torch.float16)})), "shape"),
        (lambda f: _rewrite(f, lambda t: t.update({"model.norm.weight": torch.full((64,), float("nan"))})), "NaN"),
    ],
)
def test_damaged_checkpoints_fail_with_one_line(checkpoint: Path, damage, message: str) -> None:
    damage(checkpoint / "model.safetensors")
    with pytest.raises(QuantkitError, match=message) as info:
        quantkit.load(checkpoint)
    assert "\n" not in str(info.value)


def test_lying_config_is_refused(checkpoint: Path) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["bits"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match="q_proj.qweight has shape"):
        quantkit.load(checkpoint)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].pop("bits"), "incomplete or invalid"),
        (lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(bits=5), "unsupported bit width 5"),
        (lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(kind="nf4"), "unknown quantized tensor kind"),
        (lambda c: c["quantization_config"]["layers"].update({"model.layers.9.mlp.up_proj": {"kind": "int"}}), "does not have"),
        (lambda c: c.update(model_type="gpt2"), "unsupported architecture 'gpt2'"),
        (lambda c: c.update(num_attention_heads="many"), "invalid model config"),
    ],
)
def test_broken_config_entries_fail_with_one_line(checkpoint: Path, edit, message: str) -> None:
    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    with pytest.raises(QuantkitError, match=message) as info:
        quantkit.load(checkpoint)
    assert "\n" not in str(info.value)


def test_not_a_checkpoint(tmp_path: Path, tiny_model_dir: Path) -> None:
    with pytest.raises(QuantkitError, match="checkpoint not found"):
        quantkit.load(tmp_path / "nope")
    with pytest.raises(QuantkitError, match="not a quantkit checkpoint"):
        quantkit.load(tiny_model_dir)


def test_failed_export_leaves_nothing_behind(tmp_path: Path) -> None:
    model = tiny_model()

    class Exploding:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint("native", tmp_path / "out", model, Exploding(), {}, {"method": "rtn"})
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(QuantkitError, match="--overwrite"):
        save_checkpoint("native", tmp_path / "out", tiny_model(), None, {}, {"method": "rtn"})
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
