"""GPTQ-style calibration windows: random fixed-length token slices of random documents."""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from quantkit.errors import QuantkitError

MAX_FAILED_DRAWS = 1000


def _token_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _stream_windows(
    documents: Sequence[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random
) -> list[list[int]]:
    """Windows from all documents joined into one token stream (used when every document is too short)."""
    ids = _token_ids(tokenizer, "\n\n".join(documents))
    if len(ids) <= seqlen:
        raise QuantkitError(
            f"the calibration text has only {len(ids)} tokens; seqlen {seqlen} needs at least {seqlen + 1}"
        )
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(nsamples)]
    return [ids[start : start + seqlen] for start in starts]


def sample_windows(
    documents: Sequence[str], tokenizer, nsamples: int, seqlen: int, seed: int, anchored: bool = False
) -> torch.Tensor:
    """[nsamples, seqlen] int64 token windows, each from a random document longer than seqlen tokens.

    Documents are drawn with `random.Random(seed)` and tokenized once each. If no document long enough turns
    up (all tokenized, or MAX_FAILED_DRAWS draws), windows come from the documents joined into one stream.
    `anchored`: each window opens at its document's first token (a chat conversation, which its template opens)
    and no document gives two; the windows still missing come from the stream.
    """
    if not documents:
        raise QuantkitError("no calibration documents to sample from")
    rng = random.Random(seed)
    if anchored:
        return _anchored_windows(documents, tokenizer, nsamples, seqlen, rng)
    cache: dict[int, list[int]] = {}
    windows: list[list[int]] = []
    draws = 0
    while len(windows) < nsamples:
        index = rng.randint(0, len(documents) - 1)
        if index not in cache:
            cache[index] = _token_ids(tokenizer, documents[index])
        ids = cache[index]
        draws += 1
        if len(ids) > seqlen:
            start = rng.randint(0, len(ids) - seqlen - 1)
            windows.append(ids[start : start + seqlen])
        elif not windows and (len(cache) == len(documents) or draws >= MAX_FAILED_DRAWS):
            windows = _stream_windows(documents, tokenizer, nsamples, seqlen, rng)
    return torch.tensor(windows, dtype=torch.int64)


def _anchored_windows(
    documents: Sequence[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random
) -> torch.Tensor:
    """The first seqlen tokens of documents in a random order; the rest from the stream of all of them."""
    windows: list[list[int]] = []
    for index in rng.sample(range(len(documents)), len(documents)):
        ids = _token_ids(tokenizer, documents[index])
        if len(ids) >= seqlen:
            windows.append(ids[:seqlen])
        if len(windows) == nsamples:
            break
    if len(windows) < nsamples:
        windows += _stream_windows(documents, tokenizer, nsamples - len(windows), seqlen, rng)
    return torch.tensor(windows, dtype=torch.int64)
