"""A tiny real byte-level BPE tokenizer for tests (the one synthetic checkpoints ship with)."""

from __future__ import annotations

from functools import cache

from transformers import PreTrainedTokenizerFast

from quantkit.models.synthetic import byte_tokenizer


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with 256 byte tokens plus a few merges: any text encodes, none maps to <unk>."""
    return byte_tokenizer()
