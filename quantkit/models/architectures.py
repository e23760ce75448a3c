"""The supported architectures, one small declaration each (by ``config.model_type``); an unknown one is refused
by name before any weight is read."""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ExpertsSpec, ModelAdapter, TransformSites

_ATTENTION = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",))
_MLP = (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
_LLAMA_SITES = TransformSites(
    attention_norm="input_layernorm", attention_inputs=_ATTENTION[0], value="self_attn.v_proj",
    attention_output="self_attn.o_proj", mlp_norm="post_attention_layernorm", mlp_inputs=_MLP[0],
    up="mlp.up_proj", down="mlp.down_proj",
)
# DeepSeek's multi-head latent attention: the query (V2: q_proj; V3: q_a_proj, then q_b_proj after its norm) and
# the compressed key/value (kv_a_proj_with_mqa) read the block's normed input; kv_b_proj expands the normed latent.
_MLA = (("self_attn.q_proj", "self_attn.kv_a_proj_with_mqa"), ("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
        ("self_attn.q_b_proj",), ("self_attn.kv_b_proj",), ("self_attn.o_proj",))


def _shared(path: str) -> tuple[tuple[str, ...], ...]:
    """The groups of a shared (always active) expert MLP at ``path``."""
    return (f"{path}.gate_proj", f"{path}.up_proj"), (f"{path}.down_proj",)


def _declare(*adapters: ModelAdapter) -> dict[str, ModelAdapter]:
    return {adapter.name: adapter for adapter in adapters}


ADAPTERS: dict[str, ModelAdapter] = _declare(
    *(ModelAdapter(name, _ATTENTION + _MLP, sites=_LLAMA_SITES) for name in ("llama", "mistral", "qwen2", "qwen3")),
    # Gemma's norms scale by (1 + weight) and sit after each half too; OLMo 2 normalizes after each half only:
    # the transforms' norm folding does not hold for either.
    ModelAdapter("gemma2", _ATTENTION + _MLP),
    ModelAdapter("gemma3_text", _ATTENTION + _MLP),
    ModelAdapter("olmo2", _ATTENTION + _MLP),
    ModelAdapter("granite", _ATTENTION + _MLP),  # Llama's linears; its scalar multipliers live in the config
    ModelAdapter("phi3", (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",))),
    # Qwen3-MoE's mlp_only_layers keep a dense MLP.
    ModelAdapter("qwen3_moe", _ATTENTION + _MLP, experts=ExpertsSpec()),
    ModelAdapter("qwen2_moe", _ATTENTION + _shared("mlp.shared_expert") + _MLP, experts=ExpertsSpec(),
                 keep_float=("mlp.shared_expert_gate",)),
    # transformers' attribute for Mixtral's sparse block is `mlp`; checkpoints name it `block_sparse_moe` and the
    # experts' linears w1 (gate), w3 (up), w2 (down).
    ModelAdapter("mixtral", _ATTENTION, renamed=(("mlp", "block_sparse_moe"),),
                 experts=ExpertsSpec("block_sparse_moe.experts", "block_sparse_moe.gate", gate="w1", up="w3", down="w2")),
    # The first first_k_dense_replace blocks have a dense MLP, the rest routed and shared experts.
    *(ModelAdapter(name, _MLA + _shared("mlp.shared_experts") + _MLP, experts=ExpertsSpec())
      for name in ("deepseek_v2", "deepseek_v3")),
)


def adapter_for(model_type: str) -> ModelAdapter:
    """The declaration of a ``config.model_type``, or a clear error naming the architecture."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise QuantkitError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
