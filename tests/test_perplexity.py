"""Perplexity against a float64 computation written independently here."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_model
from quantkit.errors import QuantkitError
from quantkit.eval.perplexity import perplexity


def reference_perplexity(model, stream: torch.Tensor, seqlen: int, windows: int) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            window = stream[w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= float(logp[t, window[t + 1]])
                count += 1
    return math.exp(total / count)


def test_matches_reference_and_drops_the_partial_window() -> None:
    model = tiny_model()
    stream = torch.randint(0, 320, (3 * 40 + 17,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, stream, seqlen=40)
    assert result.windows == 3 and result.tokens == 120
    assert result.perplexity == pytest.approx(reference_perplexity(model, stream, 40, 3), rel=1e-5)
    assert perplexity(model, stream, seqlen=40, max_windows=1).perplexity == pytest.approx(
        reference_perplexity(model, stream, 40, 1), rel=1e-5
    )


def test_text_shorter_than_a_window_is_an_error() -> None:
    with pytest.raises(QuantkitError, match="fewer than one window of 64"):
        perplexity(tiny_model(), torch.arange(10), seqlen=64, dataset="tiny")
