"""Architecture adapters: where a model's decoder blocks and quantizable linears are, and their order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from quantkit.errors import QuantkitError

# Linears inside a Llama-style block, grouped by the input they share, in execution order.
_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class ModelAdapter:
    """Declares the structure the engine, exporter and loader rely on.

    ``groups`` lists the block's linears in the order the forward pass reaches them; the linears of one
    group read the same input tensor, so they share one Hessian and are quantized together.
    """

    blocks: str = "model.layers"
    embeddings: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    groups: tuple[tuple[str, ...], ...] = _LLAMA_GROUPS
    # Where transforms act: the norm before each half of the block, the linears reading it, and the value,
    # attention-output, up and down projections (relative to the block).
    attention_norm: str = "input_layernorm"
    attention_inputs: tuple[str, ...] = _LLAMA_GROUPS[0]
    value: str = "self_attn.v_proj"
    attention_output: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"
    mlp_inputs: tuple[str, ...] = _LLAMA_GROUPS[2]
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"

    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks)

    def linear_names(self) -> list[str]:
        """Linears of one block, relative to the block, in execution order."""
        return [name for group in self.groups for name in group]

    def heads(self, model: nn.Module) -> tuple[int, int, int]:
        """``(attention heads, key/value heads, head dim)`` from the model's config."""
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, getattr(config, "num_key_value_heads", None) or heads, head_dim

    def quantizable_layers(self, model: nn.Module) -> list[str]:
        """Full names of every linear the engine quantizes."""
        count = len(self.get_blocks(model))
        return [f"{self.blocks}.{i}.{name}" for i in range(count) for name in self.linear_names()]


ADAPTERS: dict[str, ModelAdapter] = {
    model_type: ModelAdapter() for model_type in ("llama", "mistral", "qwen2", "qwen3")
}


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter of a ``config.model_type``, or a clear error naming the architecture."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise QuantkitError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None
