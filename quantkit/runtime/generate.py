"""Greedy generation from a loaded model, timed: quantkit's lean decoder where the model's family has one
(:mod:`quantkit.runtime.decode`), else transformers' ``generate``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.runtime.decode import FAMILIES, LeanDecoder

DECODERS = ("auto", "lean", "transformers")


@dataclass
class Generation:
    """What one greedy generation produced and how long it took (prefill: until the first new token)."""

    text: str
    tokens: list[int]
    decoder: str
    prompt_tokens: int
    prefill_s: float
    total_s: float

    @property
    def decode_tokens_per_s(self) -> float | None:
        """New tokens after the first over the time after it (None for a single token)."""
        after = self.total_s - self.prefill_s
        return (len(self.tokens) - 1) / after if len(self.tokens) > 1 and after > 0 else None

    def as_dict(self) -> dict:
        return {**asdict(self), "decode_tokens_per_s": self.decode_tokens_per_s}


def choose_decoder(model: nn.Module, decoder: str) -> str:
    """``lean`` or ``transformers`` for ``decoder`` (one of :data:`DECODERS`) on this model."""
    if decoder not in DECODERS:
        raise QuantkitError(f"unknown decoder {decoder!r}; choose one of {', '.join(DECODERS)}")
    if decoder == "auto":
        return "lean" if model.config.model_type in FAMILIES else "transformers"
    return decoder


class _FirstToken:
    """A transformers streamer that notes when the first generated token arrives (its first ``put`` is the
    prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, _value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int, decoder: str = "auto") -> Generation:
    """Greedy continuation of ``prompt`` by ``model`` (stopping at the tokenizer's end-of-sequence token)."""
    chosen = choose_decoder(model, decoder)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"][0]
    if ids.numel() == 0:
        raise QuantkitError("the prompt is empty after tokenization")
    eos = tokenizer.eos_token_id
    first: list[float] = []
    lean = LeanDecoder(model, ids.numel() + max_new_tokens) if chosen == "lean" else None

    def note_first(_token: int) -> None:
        if not first:
            first.append(time.perf_counter())

    start = time.perf_counter()
    if lean is not None:
        tokens = lean.generate(ids, max_new_tokens, eos, note_first)
    else:
        streamer = _FirstToken()
        with torch.inference_mode():
            out = model.generate(ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=eos if eos is not None else 0, streamer=streamer)
        tokens = out[0, ids.numel():].tolist()
        first.append(streamer.at or time.perf_counter())
    total = time.perf_counter() - start
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return Generation(text, tokens, chosen, ids.numel(), first[0] - start, total)
