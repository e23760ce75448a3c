"""A tiny real byte-level BPE tokenizer, trained offline in a few milliseconds, for tests."""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Post-training quantization maps the weights of a language model to a few bits.",
    "Calibration text is cut into windows of tokens.",
]


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with 256 byte tokens plus a few merges: any text encodes, none maps to <unk>."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TRAINING_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>")
