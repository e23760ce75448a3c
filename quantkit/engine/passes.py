"""Per-block hooks over calibration data for everything that is not quantizing: observing a block's inputs,
measuring its outputs, training parameters step by step, rerunning the blocks from any one (up to the head's
log-probabilities), and swapping weights in for a while. Transforms training and allocation measurements run
their calibration data through these and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import nn

from quantkit.engine.sequential import block_output, capture_block_inputs
from quantkit.lockstep import Lockstep
from quantkit.models.adapters import ModelAdapter

BlockInputs = list[tuple[torch.Tensor, dict]]  # per batch: hidden states and the block's keyword arguments
# Called with each block in order: (index, block, the batches entering it) -> the block's outputs per batch.
BlockVisitor = Callable[[int, nn.Module, BlockInputs], list[torch.Tensor]]
Batch = TypeVar("Batch")


def block_outputs(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    """The block's outputs for each batch, without gradients."""
    with torch.no_grad():
        return [block_output(block(h, **kw)) for h, kw in inputs]


def walk_blocks(model: nn.Module, adapter: ModelAdapter, calib: torch.Tensor, batch_size: int,
                visit: BlockVisitor) -> list[torch.Tensor]:
    """Calibration windows (``batch_size`` per batch) through every decoder block in order: what ``visit``
    returns for a block enters the next one. What it returned for the last block, per batch."""
    with torch.no_grad():
        calibrated = capture_block_inputs(model, adapter, calib, batch_size)
    for i, block in enumerate(adapter.get_blocks(model)):
        calibrated.hidden = visit(i, block, calibrated.entering(i))
    return calibrated.hidden


def lockstep_outputs(block: nn.Module, inputs: BlockInputs,
                     install: Callable[[Callable[[Callable[[], None]], None]], list]) -> list[torch.Tensor]:
    """The block's outputs per batch, without gradients, the batches advancing in lockstep (one greenlet each,
    :class:`~quantkit.lockstep.Lockstep`): ``install(rendezvous)`` registers hooks that may call
    ``rendezvous(action)`` to pause until every batch got there, ``action`` then running once (the handles it
    returns are removed afterwards)."""
    lockstep = Lockstep()
    handles = install(lockstep.rendezvous)
    try:
        with torch.no_grad():
            return lockstep.run([lambda h=h, kw=kw: block_output(block(h, **kw)) for h, kw in inputs])
    finally:
        for handle in handles:
            handle.remove()


def model_outputs(model: nn.Module, batches: Iterable[torch.Tensor],
                  reduce: Callable[[torch.Tensor], Batch]) -> list[Batch]:
    """``reduce`` of the model's logits for each batch of token ids, without gradients."""
    with torch.no_grad():
        return [reduce(model(input_ids=batch, use_cache=False).logits) for batch in batches]


def train_steps(batches: Sequence[Batch], steps: int, step: Callable[[Batch], float],
                report: Callable[[int, float], object]) -> list[float]:
    """``steps`` optimisation steps cycling over ``batches``; ``step`` takes one and returns its loss, which
    ``report`` hears with the step's index. The losses, in order."""
    losses = []
    with torch.enable_grad():
        for index in range(steps):
            losses.append(step(batches[index % len(batches)]))
            report(index, losses[-1])
    return losses


@contextmanager
def input_ranges(module: nn.Module, names: Iterable[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Per-channel ``max |x|`` of each named submodule's input, filled in by every forward in the block."""
    ranges: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            amax = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            ranges[name] = torch.maximum(ranges[name], amax) if name in ranges else amax

        return hook

    handles = [module.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield ranges
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class InputStatistics:
    """What one submodule's inputs looked like over the calibration batches: per-channel sum and maximum of
    ``|x|`` (float64), how many tokens, and a random sample of whole tokens (rows)."""

    abs_sum: torch.Tensor
    abs_max: torch.Tensor
    tokens: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)

    def mean_abs(self) -> torch.Tensor:
        """Per-channel mean of ``|x|`` (float32)."""
        return (self.abs_sum / max(self.tokens, 1)).float()

    def sample(self) -> torch.Tensor:
        """The sampled tokens, ``[rows, channels]`` float32."""
        return torch.cat(self.rows)


@contextmanager
def input_statistics(module: nn.Module, names: Iterable[str], rows_per_call: int,
                     generator: torch.Generator) -> Iterator[dict[str, InputStatistics]]:
    """:class:`InputStatistics` of each named submodule's input, filled in by every forward in the block; each
    call contributes ``rows_per_call`` tokens chosen at random (by ``generator``) to the sample."""
    stats: dict[str, InputStatistics] = {}

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            absolute = x.abs()
            entry = stats.get(name)
            if entry is None:
                zeros = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
                entry = stats[name] = InputStatistics(zeros, zeros.float())
            entry.abs_sum += absolute.sum(dim=0, dtype=torch.float64)
            entry.abs_max = torch.maximum(entry.abs_max, absolute.amax(dim=0))
            entry.tokens += x.shape[0]
            chosen = torch.randperm(x.shape[0], generator=generator)[:rows_per_call]
            entry.rows.append(x[chosen.to(x.device)].clone())

        return hook

    handles = [module.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def swapped_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """The named linears compute with ``weights`` in the block, then get their own tensors back (also on an
    error): nothing the model does meanwhile reaches them."""
    own = {name: model.get_submodule(name).weight.data for name in weights}
    try:
        for name, weight in weights.items():
            model.get_submodule(name).weight.data = weight
        yield
    finally:
        for name, weight in own.items():
            model.get_submodule(name).weight.data = weight


class BlockTrace:
    """The full-precision inputs of every decoder block for each window (one window a batch), kept so that a
    model that differs from block ``i`` on is rerun from block ``i`` only, and the head that turns the last
    block's output into log-probabilities."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, windows: torch.Tensor) -> None:
        self.blocks = adapter.get_blocks(model)
        self.final_norm = model.get_submodule(adapter.final_norm)
        self.lm_head = model.get_submodule(adapter.lm_head)
        self.inputs: list[BlockInputs] = []  # [block][window]

        def keep(_index: int, block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
            self.inputs.append(inputs)
            return block_outputs(block, inputs)

        self.outputs = walk_blocks(model, adapter, windows, 1, keep)  # of the last block, per window

    def __len__(self) -> int:
        return len(self.outputs)

    def run_from(self, start: int, window: int) -> torch.Tensor:
        """The last block's output for ``window``, running the model's blocks from ``start`` on its cached input."""
        hidden = self.inputs[start][window][0]
        with torch.no_grad():
            for index in range(start, len(self.blocks)):
                hidden = block_output(self.blocks[index](hidden, **self.inputs[index][window][1]))
        return hidden

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 log-probabilities over the vocabulary, per token of one window, from the last block's output."""
        with torch.no_grad():
            return torch.log_softmax(self.lm_head(self.final_norm(hidden))[0].float(), dim=-1)
