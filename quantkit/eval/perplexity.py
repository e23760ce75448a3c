"""Perplexity under the standard protocol: one token stream, non-overlapping windows, exp of mean NLL."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.progress import progress_bar


@dataclass
class PerplexityResult:
    dataset: str
    perplexity: float
    nll: float
    windows: int
    seqlen: int
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_stream(text: str, tokenizer) -> torch.Tensor:
    """The whole text tokenized once, as GPTQ's evaluation does (the tokenizer's own special tokens kept)."""
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def window_nll(model: nn.Module, window: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over one window, computed in float32."""
    logits = model(input_ids=window[None].to(model.device), use_cache=False).logits[0, :-1].float()
    return torch.nn.functional.cross_entropy(logits, window[1:].to(logits.device)).item()


def perplexity(
    model: nn.Module,
    stream: torch.Tensor,
    seqlen: int = 2048,
    max_windows: int | None = None,
    dataset: str = "",
    label: str = "",
) -> PerplexityResult:
    """``exp`` of the mean NLL over the first ``max_windows`` (default all) full windows of ``seqlen`` tokens;
    ``label`` (the model's name) heads the progress display."""
    windows = stream.numel() // seqlen
    if windows == 0:
        raise QuantkitError(f"{dataset or 'the text'} has {stream.numel()} tokens, fewer than one window of {seqlen}")
    if max_windows is not None:
        windows = min(windows, max_windows)
    nlls = []
    with torch.no_grad(), progress_bar(transient=True) as progress:
        task = progress.add_task(f"{label + ': ' if label else ''}perplexity {dataset}", total=windows)
        for w in range(windows):
            nlls.append(window_nll(model, stream[w * seqlen : (w + 1) * seqlen]))
            progress.advance(task)
    nll = sum(nlls) / len(nlls)
    return PerplexityResult(dataset, math.exp(nll), nll, windows, seqlen, windows * seqlen)
