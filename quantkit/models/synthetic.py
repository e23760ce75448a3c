"""Random-weight checkpoints, written block by block as sharded safetensors (for scale tests and benchmarks: any
depth, without ever holding the whole model in memory): Llama-shaped dense models and Qwen3-MoE-shaped
mixture-of-experts models, their routed experts stored one expert at a time as hub checkpoints store them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantkit.export.atomic import atomic_directory
from quantkit.export.safetensors_io import finish_parts, write_part

INIT_STD = 0.02  # transformers' default initializer_range for Llama and Qwen3-MoE


@dataclass(frozen=True)
class SyntheticShape:
    """A Llama: ``num_blocks`` decoder blocks, each with one dense MLP of ``intermediate_size``."""

    num_blocks: int
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 8192


@dataclass(frozen=True)
class SyntheticMoeShape:
    """A Qwen3-MoE: ``num_blocks`` decoder blocks, each routing every token to ``num_experts_per_tok`` of its
    ``num_experts`` MLPs of ``moe_intermediate_size`` (no shared expert, every block sparse)."""

    num_blocks: int
    hidden_size: int = 1024
    moe_intermediate_size: int = 512
    num_experts: int = 16
    num_experts_per_tok: int = 2
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 8192

    def dense_equivalent(self) -> SyntheticShape:
        """The Llama of the same width, heads, depth and vocabulary whose one MLP per block holds as many
        parameters as all the experts of a block (intermediate size ``num_experts * moe_intermediate_size``)."""
        return SyntheticShape(self.num_blocks, self.hidden_size, self.num_experts * self.moe_intermediate_size,
                              self.num_attention_heads, self.num_key_value_heads, self.vocab_size)


def byte_tokenizer():
    """A byte-level BPE tokenizer (256 bytes, an end-of-text token, a few merges): any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(["The quick brown fox jumps over the lazy dog.",
                                   "Post-training quantization maps the weights of a language model to a few bits.",
                                   "Calibration text is cut into windows of tokens."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")


def _config_fields(shape: SyntheticShape | SyntheticMoeShape, dtype: torch.dtype) -> dict:
    """Config arguments every synthetic model shares: the shape's own fields (depth as ``num_hidden_layers``),
    an untied head, the byte tokenizer's end-of-text token."""
    fields = {k: v for k, v in asdict(shape).items() if k != "num_blocks"}
    return fields | {"num_hidden_layers": shape.num_blocks, "max_position_embeddings": 4096,
                     "tie_word_embeddings": False, "dtype": dtype, "bos_token_id": None, "eos_token_id": 256,
                     "pad_token_id": None}


def _llama_config(shape: SyntheticShape, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(**_config_fields(shape, dtype))


def _qwen3_moe_config(shape: SyntheticMoeShape, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**_config_fields(shape, dtype), head_dim=shape.hidden_size // shape.num_attention_heads,
                          norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])


def _random_linears(prefix: str, sizes: dict[str, tuple[int, int]], dtype: torch.dtype,
                    generator: torch.Generator) -> dict:
    """``{prefix}.{name}.weight`` of ``sizes[name]`` (out, in), normal with the initializer's spread."""
    return {f"{prefix}.{name}.weight": (torch.randn(size, generator=generator) * INIT_STD).to(dtype)
            for name, size in sizes.items()}


def _random_norms(prefix: str, names: tuple[str, ...], size: int, dtype: torch.dtype,
                  generator: torch.Generator) -> dict:
    """RMSNorm weights near one (not exactly, so that a norm folded into a linear is not a no-op)."""
    return {f"{prefix}.{name}.weight": (1 + 0.1 * torch.randn(size, generator=generator)).to(dtype) for name in names}


def _attention_sizes(shape: SyntheticShape | SyntheticMoeShape) -> dict[str, tuple[int, int]]:
    head_dim = shape.hidden_size // shape.num_attention_heads
    h, q, kv = shape.hidden_size, shape.num_attention_heads * head_dim, shape.num_key_value_heads * head_dim
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q)}


def _mlp_sizes(prefix: str, hidden: int, inner: int) -> dict[str, tuple[int, int]]:
    return {f"{prefix}gate_proj": (inner, hidden), f"{prefix}up_proj": (inner, hidden),
            f"{prefix}down_proj": (hidden, inner)}


_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


def _llama_block(shape: SyntheticShape, index: int, dtype: torch.dtype, generator: torch.Generator) -> dict:
    prefix = f"model.layers.{index}"
    sizes = _attention_sizes(shape) | _mlp_sizes("mlp.", shape.hidden_size, shape.intermediate_size)
    return (_random_linears(prefix, sizes, dtype, generator)
            | _random_norms(prefix, _LAYER_NORMS, shape.hidden_size, dtype, generator))


def _qwen3_moe_block(shape: SyntheticMoeShape, index: int, dtype: torch.dtype, generator: torch.Generator) -> dict:
    prefix = f"model.layers.{index}"
    head_dim = shape.hidden_size // shape.num_attention_heads
    tensors = _random_linears(prefix, _attention_sizes(shape), dtype, generator)
    tensors |= _random_norms(f"{prefix}.self_attn", ("q_norm", "k_norm"), head_dim, dtype, generator)
    tensors |= _random_linears(prefix, {"mlp.gate": (shape.num_experts, shape.hidden_size)}, dtype, generator)
    for e in range(shape.num_experts):
        sizes = _mlp_sizes(f"mlp.experts.{e}.", shape.hidden_size, shape.moe_intermediate_size)
        tensors |= _random_linears(prefix, sizes, dtype, generator)
    return tensors | _random_norms(prefix, _LAYER_NORMS, shape.hidden_size, dtype, generator)


def _write_checkpoint(folder: Path, shape: SyntheticShape | SyntheticMoeShape, config,
                      block: Callable[[int, torch.Generator], dict], dtype: torch.dtype, seed: int) -> None:
    """One shard for the embeddings, final norm and head, then one shard per block from ``block(index,
    generator)``, generated and written one at a time; ``config`` and a byte-level tokenizer beside."""
    generator = torch.Generator().manual_seed(seed)
    with atomic_directory(folder, overwrite=True) as staging:
        parts = ["part-outer.safetensors"]
        write_part({
            "model.embed_tokens.weight": (torch.randn(shape.vocab_size, shape.hidden_size, generator=generator)
                                          * INIT_STD).to(dtype),
            "model.norm.weight": torch.ones(shape.hidden_size, dtype=dtype),
            "lm_head.weight": (torch.randn(shape.vocab_size, shape.hidden_size, generator=generator)
                               * INIT_STD).to(dtype),
        }, staging / parts[0])
        for index in range(shape.num_blocks):
            parts.append(f"part-{index:05d}.safetensors")
            write_part(block(index, generator), staging / parts[-1])
        finish_parts(staging, parts)
        config.save_pretrained(staging)
        byte_tokenizer().save_pretrained(staging)


def write_synthetic_llama(folder: Path, shape: SyntheticShape, dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0) -> None:
    """Write a random Llama of ``shape`` at ``folder``: one shard for the embeddings, final norm and head, then
    one shard per block, generated and written one at a time; config.json and a byte-level tokenizer beside."""
    _write_checkpoint(folder, shape, _llama_config(shape, dtype),
                      lambda index, generator: _llama_block(shape, index, dtype, generator), dtype, seed)


def write_synthetic_qwen3_moe(folder: Path, shape: SyntheticMoeShape, dtype: torch.dtype = torch.bfloat16,
                              seed: int = 0) -> None:
    """Write a random Qwen3-MoE of ``shape`` at ``folder``, block by block as :func:`write_synthetic_llama`
    does. Each block holds the attention (with its per-head ``q_norm``/``k_norm``), the router
    ``mlp.gate.weight`` ``[experts, hidden]`` and every expert's ``mlp.experts.E.{gate,up,down}_proj.weight``;
    routing weights are random like the rest, so calibration spreads tokens over the experts roughly evenly."""
    _write_checkpoint(folder, shape, _qwen3_moe_config(shape, dtype),
                      lambda index, generator: _qwen3_moe_block(shape, index, dtype, generator), dtype, seed)
