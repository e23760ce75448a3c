"""KL divergence of a candidate model from the full-precision one on fixed calibration windows.

The engine's :class:`~quantkit.engine.passes.BlockTrace` keeps the full-precision input of every decoder block,
so a candidate that differs only from block ``i`` on is run from block ``i``, and turns the last block's output
into log-probabilities; the teacher's are cached.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantkit.engine.passes import BlockTrace
from quantkit.models.adapters import ModelAdapter


class KLMeter:
    """``KL(teacher ‖ model)`` per token, averaged over chosen windows; the teacher is the model at construction."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor) -> None:
        self.trace = BlockTrace(model, adapter, windows)
        self.teacher = [self.trace.log_probs(h) for h in self.trace.outputs]

    def __call__(self, windows: Sequence[int] | None = None, start_block: int = 0) -> float:
        """Mean per-token KL over ``windows`` (default all), running the blocks from ``start_block`` on."""
        chosen = range(len(self.trace)) if windows is None else windows
        total, tokens = 0.0, 0
        with torch.no_grad():
            for w in chosen:
                teacher = self.teacher[w]
                student = self.trace.log_probs(self.trace.run_from(start_block, w))
                total += float((teacher.exp() * (teacher - student)).sum())
                tokens += teacher.shape[0]
        return total / tokens
