"""Random-weight Llama-shaped checkpoints, written block by block as sharded safetensors (for scale tests and
benchmarks: any depth, without ever holding the whole model in memory)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quantkit.export.atomic import atomic_directory
from quantkit.export.safetensors_io import finish_parts, write_part

INIT_STD = 0.02  # transformers' default initializer_range for Llama


@dataclass(frozen=True)
class SyntheticShape:
    num_blocks: int
    hidden_size: int = 1024
    intermediate_size: int = 2816
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    vocab_size: int = 8192


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


def _config(shape: SyntheticShape, dtype: torch.dtype):
    from transformers import LlamaConfig

    return LlamaConfig(**asdict(shape) | {"num_hidden_layers": shape.num_blocks}, max_position_embeddings=4096,
                       tie_word_embeddings=False, dtype=dtype, bos_token_id=None, eos_token_id=256, pad_token_id=None)


def _block_tensors(shape: SyntheticShape, index: int, dtype: torch.dtype, generator: torch.Generator) -> dict:
    head_dim = shape.hidden_size // shape.num_attention_heads
    kv = shape.num_key_value_heads * head_dim
    h, m = shape.hidden_size, shape.intermediate_size
    linears = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, h), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m)}
    prefix = f"model.layers.{index}"
    tensors = {f"{prefix}.{name}.weight": (torch.randn(size, generator=generator) * INIT_STD).to(dtype)
               for name, size in linears.items()}
    for norm in ("input_layernorm", "post_attention_layernorm"):
        tensors[f"{prefix}.{norm}.weight"] = (1 + 0.1 * torch.randn(h, generator=generator)).to(dtype)
    return tensors


def write_synthetic_llama(folder: Path, shape: SyntheticShape, dtype: torch.dtype = torch.bfloat16,
                          seed: int = 0) -> None:
    """Write a random Llama of ``shape`` at ``folder``: one shard for the embeddings, final norm and head, then
    one shard per block, generated and written one at a time; config.json and a byte-level tokenizer beside."""
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
            write_part(_block_tensors(shape, index, dtype, generator), staging / parts[-1])
        finish_parts(staging, parts)
        _config(shape, dtype).save_pretrained(staging)
        byte_tokenizer().save_pretrained(staging)
