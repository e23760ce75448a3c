"""KL divergence of a candidate model from the full-precision one on fixed calibration windows.

The engine's :class:`~quantkit.engine.passes.BlockTrace` keeps the full-precision input of every decoder block,
so a candidate that differs only from block ``i`` on is run from block ``i``, and turns the last block's output
into log-probabilities; the teacher's are cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.engine.passes import BlockTrace
from quantkit.models.adapters import ModelAdapter


@dataclass(frozen=True)
class Divergence:
    """How far a model's next-token distributions are from the teacher's, per token on average."""

    kl: float  # mean KL(teacher ‖ model)
    top1: float  # fraction of tokens whose most likely next token is the teacher's


class KLMeter:
    """``KL(teacher ‖ model)`` per token, averaged over chosen windows. The teacher is the model at construction,
    or given log-probabilities per window (then the trace still caches this model's own block inputs: a
    quantized model measured against its float teacher)."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor,
                 teacher: list[torch.Tensor] | None = None) -> None:
        self.trace = BlockTrace(model, adapter, windows)
        self.teacher = teacher if teacher is not None else [self.trace.log_probs(h) for h in self.trace.outputs]

    def __call__(self, windows: Sequence[int] | None = None, start_block: int = 0) -> float:
        """Mean per-token KL over ``windows`` (default all), running the blocks from ``start_block`` on."""
        return self.measure(windows, start_block).kl

    def measure(self, windows: Sequence[int] | None = None, start_block: int | None = 0) -> Divergence:
        """Mean per-token KL and top-1 agreement over ``windows`` (default all), from ``start_block`` on (None:
        the model as traced, from the cached outputs)."""
        chosen = range(len(self.trace)) if windows is None else windows
        total, agree, tokens = 0.0, 0, 0
        with torch.no_grad():
            for w in chosen:
                teacher = self.teacher[w]
                hidden = self.trace.outputs[w] if start_block is None else self.trace.run_from(start_block, w)
                student = self.trace.log_probs(hidden)
                total += float((teacher.exp() * (teacher - student)).sum())
                agree += int((teacher.argmax(dim=-1) == student.argmax(dim=-1)).sum())
                tokens += teacher.shape[0]
        return Divergence(total / tokens, agree / tokens)
