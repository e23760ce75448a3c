"""Every supported architecture, built tiny and random from its transformers config: the declaration places
every linear, the engine replays the blocks exactly (per-block masks and rotary embeddings included), RTN and
GPTQ checkpoints load back close to the float model, and routed experts are quantized from their own tokens."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import quantkit
from conftest import saved_with_tokenizer
from quantkit.api import CalibrationSpec, quantize
from quantkit.engine import EngineOptions, check_layers, quantize_model
from quantkit.engine.passes import block_outputs, walk_blocks
from quantkit.engine.sequential import expert_batches
from quantkit.errors import QuantkitError
from quantkit.models.architectures import ADAPTERS, adapter_for
from quantkit.models.experts import RoutedExperts, stored_modules
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.gptq import GPTQQuantizer
from quantkit.schemes import QuantScheme
from quantkit.transforms import make_transform

VOCAB = 320
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
_MOE = dict(moe_intermediate_size=32, num_experts_per_tok=2)
_MLA = dict(_MOE, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1)
# The fields each family needs beyond the shared ones (small heads, experts, sliding windows shorter than the
# calibration windows so that sliding and global layers differ).
FAMILIES: dict[str, dict] = {
    "llama": dict(head_dim=16), "mistral": dict(head_dim=16, sliding_window=8), "qwen2": dict(),
    "qwen3": dict(head_dim=16), "gemma2": dict(head_dim=16, sliding_window=8),
    "gemma3_text": dict(head_dim=16, sliding_window=8), "phi3": dict(pad_token_id=0), "olmo2": dict(), "granite": dict(),
    "qwen3_moe": dict(_MOE, num_experts=4, head_dim=16),
    "qwen2_moe": dict(_MOE, num_experts=4, shared_expert_intermediate_size=48),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=48),
    "deepseek_v2": dict(_MLA, q_lora_rank=None), "deepseek_v3": dict(_MLA, q_lora_rank=32),
}
MOE = ("qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3")
W4 = QuantScheme(4, 16, True)
W8 = QuantScheme(8, 16, True)


def family_model(model_type: str, seed: int = 0):
    """A random 2-block model of ``model_type`` (float32, eval, no gradients), as transformers builds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **(_BASE | FAMILIES[model_type]))
    model = AutoModelForCausalLM.from_config(config).eval()
    return model.requires_grad_(False)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: saved_with_tokenizer(family_model(name), tmp_path_factory.mktemp(name)) for name in FAMILIES}


def _ids(rows: int = 4, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, length), generator=torch.Generator().manual_seed(seed))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_the_families_the_issue_names_are_declared() -> None:
    assert set(FAMILIES) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_declaration_places_every_linear_and_the_replay_is_the_model(model_type: str) -> None:
    """Stored modules compute the same function; every block's linears are placed; running the blocks one by one on
    the captured inputs (each block its own masks and rotary tables) gives the model's own final hidden states."""
    model, adapter = family_model(model_type), adapter_for(model_type)
    ids = _ids()
    with torch.no_grad():
        reference = model(ids).logits
    stored_modules(model, adapter)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, reference, atol=1e-5)
    check_layers(model, adapter, lambda _name: W4)
    final: list[torch.Tensor] = []
    handle = model.get_submodule(adapter.final_norm).register_forward_pre_hook(lambda _m, a: final.append(a[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    replayed = walk_blocks(model, adapter, ids, 2, lambda _i, block, inputs: block_outputs(block, inputs))
    assert torch.allclose(torch.cat(replayed), final[0], atol=1e-5)
    if model_type in MOE:
        assert any(isinstance(m, RoutedExperts) for m in model.modules())


def test_a_linear_the_declaration_does_not_place_is_refused() -> None:
    model = family_model("llama")
    partial = dataclasses.replace(adapter_for("llama"), groups=adapter_for("llama").groups[:-1])
    with pytest.raises(QuantkitError, match=r"model\.layers\.0\.mlp\.down_proj is a linear the llama declaration"):
        check_layers(model, partial, lambda _name: W4)


def test_an_unknown_architecture_is_refused_by_name_before_weights_load(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(QuantkitError, match="unsupported architecture 'gpt2'"):
        quantize(str(tmp_path), method="rtn", scheme=W4, output=tmp_path / "out")


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_quantizes_and_loads_back_close_to_float(model_type: str, method: str, family_dirs: dict,
                                                              calib_file: Path, tmp_path: Path) -> None:
    """W8: the loaded checkpoint's logits are close to the float model's; and they are the quantizing run's own
    (fake-quantized) logits, so the checkpoint holds exactly what was quantized."""
    result = quantize(str(family_dirs[model_type]), method=method, scheme=W8, output=tmp_path / "q",
                      calibration=CalibrationSpec(str(calib_file), 4, 32, expert_min_tokens=8))
    ids = _ids()
    with torch.no_grad():
        fake = result.model(ids).logits
        loaded = quantkit.load(tmp_path / "q")(ids).logits
        float_logits = family_model(model_type)(ids).logits
    assert torch.isfinite(loaded).all()
    assert _relative(loaded, fake) < 1e-4
    assert _relative(loaded, float_logits) < 0.03
    expected = len(adapter_for(model_type).quantizable_layers(result.model))
    assert len(result.quantized) == expected


@pytest.mark.parametrize("layout", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_moe_layouts_load_back_in_quantkit_with_the_hub_names(model_type: str, layout: str, family_dirs: dict,
                                                              calib_file: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    result = quantize(str(family_dirs[model_type]), method="gptq", scheme=W4, output=tmp_path / "q", layout=layout,
                      calibration=CalibrationSpec(str(calib_file), 4, 32, expert_min_tokens=8))
    ids = _ids()
    with torch.no_grad():
        fake = result.model(ids).logits
        loaded = quantkit.load(tmp_path / "q")(ids).logits
    assert _relative(loaded, fake) < 1e-3
    with safe_open(str(next((tmp_path / "q").glob("*.safetensors"))), framework="pt") as f:
        names = set(f.keys())
    stored = {"qwen3_moe": "model.layers.1.mlp.experts.3.down_proj",
              "mixtral": "model.layers.1.block_sparse_moe.experts.3.w2",
              "deepseek_v3": "model.layers.1.mlp.experts.3.down_proj"}[model_type]
    packed = "qweight" if layout == "gptq" else "weight_packed"
    assert f"{stored}.{packed}" in names  # the names hub checkpoints (and vLLM) use, one tensor set per expert
    router = "block_sparse_moe.gate" if model_type == "mixtral" else "mlp.gate"
    assert f"model.layers.1.{router}.weight" in names  # the router stays float
    if layout == "compressed-tensors":  # and is listed as such: vLLM builds routers as linears
        qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
        assert f"model.layers.1.{router}" in qc["ignore"]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_transformers_reads_a_compressed_tensors_moe_checkpoint(model_type: str, family_dirs: dict, calib_file: Path,
                                                                tmp_path: Path) -> None:
    """transformers (with compressed-tensors) decompresses the per-expert tensors and stacks them into its own
    experts module: the same logits as quantkit's load."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    quantize(str(family_dirs[model_type]), method="gptq", scheme=W4, output=tmp_path / "q",
             layout="compressed-tensors", calibration=CalibrationSpec(str(calib_file), 4, 32, expert_min_tokens=8))
    ids = _ids()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"), quantization_config=CompressedTensorsConfig(
        run_compressed=False, dequantize=True)).eval()
    with torch.no_grad():
        assert _relative(hf(ids).logits.float(), quantkit.load(tmp_path / "q")(ids).logits) < 1e-3


def _routing_bias_starving(model, expert: int) -> None:
    """Make DeepSeek's routers never pick ``expert`` (its selection bias far below the others')."""
    for block in model.model.layers[1:]:
        block.mlp.gate.e_score_correction_bias[expert] = -1e4


def test_an_expert_no_token_reaches_is_quantized_from_all_tokens_and_reported(calib_file: Path,
                                                                             tmp_path: Path) -> None:
    model = family_model("deepseek_v3")
    _routing_bias_starving(model, 3)
    folder = saved_with_tokenizer(model, tmp_path / "model")
    result = quantize(str(folder), method="gptq", scheme=W4, output=tmp_path / "q",
                      calibration=CalibrationSpec(str(calib_file), 4, 32, expert_min_tokens=8))
    experts = result.quantization_config["experts"]
    assert experts["starved"] == {"model.layers.1.mlp.experts.3": 0}
    assert experts["count"] == 4 and experts["min_tokens"] == 8
    loaded = quantkit.load(tmp_path / "q")
    assert torch.isfinite(loaded.model.layers[1].mlp.experts[3].down_proj.quantized().dequantize()).all()
    with torch.no_grad():
        assert torch.isfinite(loaded(_ids()).logits).all()


def _reference_expert_hessians(model_type: str, ids: torch.Tensor,
                               expert: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Block 0's Hessians of ``expert``'s gate/up input and down input, float64, by a loop over the tokens the
    float model (transformers' own stacked experts) routes to it."""
    model = family_model(model_type)
    experts = model.model.layers[0].mlp.experts
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = experts.register_forward_pre_hook(lambda _m, args: seen.append((args[0], args[1])))
    with torch.no_grad():
        model(ids)
    handle.remove()
    inner = experts.gate_up_proj.shape[1] // 2
    gate, up, down_in = experts.gate_up_proj[expert, :inner], experts.gate_up_proj[expert, inner:], []
    xs = []
    for hidden, index in seen:
        for token in range(hidden.shape[0]):
            if expert in index[token].tolist():
                x = hidden[token]
                xs.append(x.double())
                down_in.append((experts.act_fn(gate @ x) * (up @ x)).double())

    def hessian(rows: list[torch.Tensor]) -> torch.Tensor:
        return 2 / len(rows) * sum(torch.outer(r, r) for r in rows)

    return hessian(xs), hessian(down_in), len(xs)


def test_an_experts_hessian_is_built_from_its_routed_tokens_only() -> None:
    model_type, expert = "qwen3_moe", 2
    ids = _ids(rows=2, length=24)
    seen: dict[str, torch.Tensor] = {}
    quantizer = make_quantizer("gptq")

    def record(name, weight, stats, scheme):
        seen[name] = stats.hessian
        return quantizer.quantize(weight, stats, scheme)

    model, adapter = family_model(model_type), adapter_for(model_type)
    stored_modules(model, adapter)
    options = EngineOptions(true_sequential=False, quantize_layer=record, expert_min_tokens=0)
    quantize_model(model, adapter, quantizer, lambda _name: W4, ids, options)
    gate_up, down, routed = _reference_expert_hessians(model_type, ids, expert)
    prefix = f"model.layers.0.mlp.experts.{expert}"
    assert options.expert_tokens[prefix] == routed
    for name, reference in ((f"{prefix}.gate_proj", gate_up), (f"{prefix}.up_proj", gate_up),
                            (f"{prefix}.down_proj", down)):
        assert torch.allclose(seen[name], reference, rtol=1e-4, atol=1e-6), name
    assert 0 < routed < ids.numel()  # routed tokens, not all of them


def test_experts_solved_in_one_batch_equal_experts_solved_one_at_a_time() -> None:
    """The default budget puts a block's four experts in one batched solve per group of linears; a budget of one
    byte solves them one at a time: the same tensors, byte for byte."""
    ids = _ids(rows=2, length=24)
    batch_sizes: list[int] = []

    class CountingGPTQ(GPTQQuantizer):
        def quantize_together(self, weights, stats, scheme):
            batch_sizes.append(len({id(layer.hessian) for layer in stats}))  # distinct Hessians in one call
            return super().quantize_together(weights, stats, scheme)

    runs = {}
    for budget in (EngineOptions().expert_batch_bytes, 1):
        model, adapter = family_model("qwen3_moe"), adapter_for("qwen3_moe")
        stored_modules(model, adapter)
        experts = model.model.layers[0].mlp.experts
        assert [len(batch) for batch in expert_batches(experts, budget)] == ([4] if budget > 1 else [1, 1, 1, 1])
        options = EngineOptions(expert_batch_bytes=budget, expert_min_tokens=0)
        runs[budget] = quantize_model(model, adapter, CountingGPTQ(), lambda _name: W4, ids, options)
    batched, alone = runs.values()
    assert batched.keys() == alone.keys() and any(".experts.3." in name for name in batched)
    for name, qt in batched.items():
        for key, tensor in qt.to_tensors().items():
            assert torch.equal(tensor, alone[name].to_tensors()[key]), (name, key)
    assert max(batch_sizes) == 4  # some solve took the four experts' Hessians at once


def test_a_starved_expert_takes_every_token_of_its_block() -> None:
    """Below the threshold the expert's Hessian is the one of all the block's tokens at its input."""
    ids = _ids(rows=2, length=24)
    seen: dict[str, torch.Tensor] = {}
    quantizer = make_quantizer("gptq")

    def record(name, weight, stats, scheme):
        seen[name] = (stats.hessian, stats.tokens)
        return quantizer.quantize(weight, stats, scheme)

    model, adapter = family_model("qwen3_moe"), adapter_for("qwen3_moe")
    stored_modules(model, adapter)
    options = EngineOptions(true_sequential=False, quantize_layer=record, expert_min_tokens=10**6)
    quantize_model(model, adapter, quantizer, lambda _name: W4, ids, options)
    assert all(seen[f"model.layers.0.mlp.experts.{e}.gate_proj"][1] == ids.numel() for e in range(4))
    first = seen["model.layers.0.mlp.experts.0.gate_proj"][0]
    assert torch.equal(first, seen["model.layers.0.mlp.experts.3.gate_proj"][0])
    assert options.experts_record()["starved"].keys() == {f"model.layers.{b}.mlp.experts.{e}"
                                                          for b in range(2) for e in range(4)}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_a_streamed_moe_run_resumed_after_a_crash_equals_the_resident_one(model_type: str, family_dirs: dict,
                                                                           calib_file: Path, tmp_path: Path) -> None:
    """Streamed from disk over two devices, crashed at block 1 and resumed: the resident run's tensors and record
    (the starved experts of the block finished before the crash included)."""
    from test_streaming import _crash_at_block, _tensors

    options = dict(method="gptq", scheme=W4, calibration=CalibrationSpec(str(calib_file), 4, 32, expert_min_tokens=60))
    quantize(str(family_dirs[model_type]), output=tmp_path / "resident", **options)
    streamed = dict(options, output=tmp_path / "streamed", offload="disk", devices=["cpu", "cpu"])
    with _crash_at_block(1), pytest.raises(RuntimeError, match="simulated crash"):
        quantize(str(family_dirs[model_type]), **streamed)
    quantize(str(family_dirs[model_type]), **streamed)
    assert _tensors(tmp_path / "resident") == _tensors(tmp_path / "streamed"), model_type
    records = [json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]["experts"]
               for name in ("resident", "streamed")]
    assert records[0] == records[1] and records[0]["count"] == 8
    assert any(name.startswith("model.layers.0.") for name in records[0]["starved"])  # finished before the crash


@pytest.mark.parametrize("method, scheme", [("spqr", QuantScheme(3, 16, False)),
                                            ("rtn", QuantScheme(4, 16, True, "nvfp4"))])
def test_other_quantizers_take_moe_models(method: str, scheme: QuantScheme, family_dirs: dict, calib_file: Path,
                                          tmp_path: Path) -> None:
    result = quantize(str(family_dirs["qwen3_moe"]), method=method, scheme=scheme, output=tmp_path / "q",
                      calibration=CalibrationSpec(str(calib_file), 4, 32, expert_min_tokens=8))
    ids = _ids()
    with torch.no_grad():
        assert _relative(quantkit.load(tmp_path / "q")(ids).logits, result.model(ids).logits) < 1e-3


def test_an_expert_is_one_allocation_unit() -> None:
    from quantkit.allocation.units import make_units

    model, adapter = family_model("qwen2_moe"), adapter_for("qwen2_moe")
    stored_modules(model, adapter)
    units = {unit.name: unit.layers for unit in make_units(adapter, adapter.get_blocks(model), "group")}
    assert units["model.layers.1.mlp.experts.2"] == tuple(
        f"model.layers.1.mlp.experts.2.{name}" for name in ("gate_proj", "up_proj", "down_proj"))
    assert "model.layers.0.mlp.shared_expert.gate_proj+model.layers.0.mlp.shared_expert.up_proj" not in units
    assert "model.layers.0.mlp.shared_expert.gate_proj+mlp.shared_expert.up_proj" in units
    assert sum(len(layers) for layers in units.values()) == len(adapter.quantizable_layers(model))


def test_transforms_refuse_an_architecture_they_do_not_apply_to(family_dirs: dict, calib_file: Path,
                                                               tmp_path: Path) -> None:
    with pytest.raises(QuantkitError, match="transforms do not apply to architecture 'gemma2'"):
        quantize(str(family_dirs["gemma2"]), method="rtn", scheme=W4, output=tmp_path / "q",
                 transform=make_transform("hadamard"),
                 calibration=CalibrationSpec(str(calib_file), 4, 32))
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_transformers_from_pretrained_of_a_native_moe_checkpoint_is_quantkit_load(model_type: str, family_dirs: dict,
                                                                                   tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    quantize(str(family_dirs[model_type]), method="rtn", scheme=W4, output=tmp_path / "q")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))(ids).logits,
                           quantkit.load(tmp_path / "q")(ids).logits)


def test_vllm_cpu_refusals_of_moe_experts_are_warned_before_the_model_loads(family_dirs: dict, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    """vLLM 0.32's CPU build serves int4 experts only with AMX or zentorch (see README, Which runtime loads
    what): a GPTQ-layout MoE run says so first; a dense model's does not."""
    for model_type in ("qwen3_moe", "llama"):
        quantize(str(family_dirs[model_type]), method="rtn", scheme=W4, output=tmp_path / model_type, layout="gptq")
    err = capsys.readouterr().err
    assert err.count("serves 4-bit routed experts only on a CPU with AMX") == 1
    assert err.index("serves 4-bit routed experts") < err.index(f"loading {family_dirs['qwen3_moe']}")


def test_mixed_bits_on_a_moe_model_give_each_expert_one_width(family_dirs: dict, calib_file: Path,
                                                             tmp_path: Path) -> None:
    """An allocation at group granularity over a MoE model: every expert's three linears share one width, the
    written bits per weight meet the target, and the checkpoint loads back."""
    from quantkit.allocation.options import AllocationOptions
    from quantkit.allocation.search import SearchBudget

    options = AllocationOptions(5.0, bit_choices=(2, 4, 8), granularity="group", kl_windows=2, kl_seqlen=32,
                                search=SearchBudget(generations=2, offspring=3, survivors=(2, 1), windows=(1, 2)))
    result = quantize(str(family_dirs["qwen3_moe"]), method="rtn", scheme=W4, output=tmp_path / "q",
                      calibration=CalibrationSpec(str(calib_file), 4, 32), allocation=options)
    bits = result.quantization_config["allocation"]["layer_bits"]
    for block in range(2):
        for expert in range(4):
            widths = {bits[f"model.layers.{block}.mlp.experts.{expert}.{n}"] for n in ("gate_proj", "up_proj", "down_proj")}
            assert len(widths) == 1
    assert len(set(bits.values())) > 1
    assert result.quantization_config["allocation"]["bits_per_weight"] <= 5.0
    with torch.no_grad():
        assert torch.isfinite(quantkit.load(tmp_path / "q")(_ids()).logits).all()
