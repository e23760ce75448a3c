"""KL divergence of a candidate model from the full-precision one on fixed calibration windows.

The inputs of every decoder block under full precision are cached once, so a candidate that differs only
from block ``i`` on is run from block ``i``; the teacher's log-probabilities are cached too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from quantkit.engine import block_output, capture_block_inputs
from quantkit.models.adapters import ModelAdapter


class KLMeter:
    """``KL(teacher ‖ model)`` per token, averaged over chosen windows; the teacher is the model at construction."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor) -> None:
        self.model, self.adapter, self.windows = model, adapter, windows.shape[0]
        self.blocks = adapter.get_blocks(model)
        self.final_norm = model.get_submodule(adapter.final_norm)
        self.lm_head = model.get_submodule(adapter.lm_head)
        with torch.no_grad():
            entering = capture_block_inputs(model, adapter, windows, 1)
            self.kwargs = [kwargs for _, kwargs in entering]
            self.inputs: list[list[torch.Tensor]] = []  # [block][window]
            hidden = [h for h, _ in entering]
            for block in self.blocks:
                self.inputs.append(hidden)
                hidden = [block_output(block(h, **kw)) for h, kw in zip(hidden, self.kwargs)]
            self.teacher = [self._log_probs(h) for h in hidden]

    def _log_probs(self, final_hidden: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.lm_head(self.final_norm(final_hidden))[0].float(), dim=-1)

    def __call__(self, windows: Sequence[int] | None = None, start_block: int = 0) -> float:
        """Mean per-token KL over ``windows`` (default all), running the blocks from ``start_block`` on."""
        chosen = range(self.windows) if windows is None else windows
        total, tokens = 0.0, 0
        with torch.no_grad():
            for w in chosen:
                hidden = self.inputs[start_block][w]
                for block in self.blocks[start_block:]:
                    hidden = block_output(block(hidden, **self.kwargs[w]))
                teacher = self.teacher[w]
                student = self._log_probs(hidden)
                total += float((teacher.exp() * (teacher - student)).sum())
                tokens += teacher.shape[0]
        return total / tokens
