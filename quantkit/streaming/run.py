"""Quantizing a model larger than memory: one decoder block at a time from the shards, each finished block
written out at once, activations spilled to disk, and a killed run resumed from its last finished block."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.engine import (
    EngineOptions,
    block_devices,
    calibration_batch,
    capture_block_inputs,
    check_layers,
    quantize_blocks,
)
from quantkit.errors import QuantkitError
from quantkit.export.atomic import publish_directory
from quantkit.export.native import checkpoint_tensors, layer_records, native_config
from quantkit.export.safetensors_io import finish_parts, write_part
from quantkit.export.writer import plain_tensors, write_side_files
from quantkit.formats.base import QuantizedTensor
from quantkit.progress import stderr_console
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme
from quantkit.streaming.source import StreamedModel
from quantkit.streaming.state import RunState, block_part, tensor_digest

if TYPE_CHECKING:
    from quantkit.api import CalibrationSpec

OUTER_PART = "part-outer.safetensors"


class StreamedBlocks:
    """The engine's blocks read from the shards on their devices; each finished block goes to the run state
    (its shard and the hidden states after it) and its weights are dropped."""

    def __init__(self, source: StreamedModel, state: RunState, placement: list[torch.device]) -> None:
        self.source, self.state, self.placement = source, state, placement

    def __len__(self) -> int:
        return self.source.num_blocks

    def load(self, index: int) -> torch.nn.Module:
        return self.source.load_block(index, self.placement[index])

    def finish(self, index: int, quantized: dict[str, QuantizedTensor],
               outputs: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        prefix = f"{self.source.adapter.blocks}.{index}."
        local = {name.removeprefix(prefix): qt for name, qt in quantized.items()}
        tensors = {prefix + name: t.cpu() for name, t in checkpoint_tensors(self.source.block(index), local).items()}
        last = index == len(self) - 1
        self.state.commit_block(index, tensors, layer_records(quantized), None if last else outputs)
        self.source.release_block(index)
        return None if outputs is None or last else self.state.inputs()


@dataclass
class StreamedRun:
    """What a streamed quantization needs besides the model."""

    quantizer: Quantizer
    scheme: QuantScheme
    calibration: CalibrationSpec
    seed: int
    options: EngineOptions
    label: str


def quantize_streamed(source: StreamedModel, tokenizer, run: StreamedRun, arguments: dict, output: Path,
                      record: dict) -> None:
    """Quantize ``source`` block by block into a native checkpoint at ``output`` (config.json recording
    ``record``), resuming the state a run with the same ``arguments`` and calibration windows left (and
    refusing, keeping that state, if they differ). Bad input found mid-run discards the state; any other
    failure keeps it for the next run."""
    check_layers(source.model, source.adapter, lambda _name: run.scheme, values=False)
    calib = _calibration(tokenizer, run) if run.quantizer.needs_calibration else None
    state = RunState.open(output, arguments)
    try:
        if calib is not None:
            state.check_calibration(tensor_digest(calib))  # a refusal keeps the state for the right windows
        try:
            _quantize_and_publish(source, tokenizer, run, state, calib, output, record)
        except QuantkitError:
            state.discard()
            raise
        state.discard()
    finally:
        state.release()


def _quantize_and_publish(source: StreamedModel, tokenizer, run: StreamedRun, state: RunState,
                          calib: torch.Tensor | None, output: Path, record: dict) -> None:
    if state.next_block:
        stderr_console.print(f"resuming at block {state.next_block + 1} of {source.num_blocks} from {state.folder}")
    devices = run.options.devices or (torch.device("cpu"),)
    source.load_outer()
    inputs = None if calib is None else _block_inputs(source, calib, run, state)
    torch.manual_seed(run.seed)
    quantize_blocks(StreamedBlocks(source, state, block_devices(source.num_blocks, devices)), source.adapter,
                    run.quantizer, lambda _name: run.scheme, inputs, run.options, run.label, start=state.next_block)
    _publish(source, tokenizer, state, record, output)


def _calibration(tokenizer, run: StreamedRun) -> torch.Tensor:
    from quantkit.calib import load_calibration

    spec = run.calibration
    if spec.source == "synthetic":
        raise QuantkitError("synthetic calibration samples from the whole model; --offload disk needs a text source")
    return load_calibration(spec.source, tokenizer, spec.nsamples, spec.seqlen, run.seed, data_dir=spec.data_dir)


def _block_inputs(source: StreamedModel, calib: torch.Tensor, run: StreamedRun,
                  state: RunState) -> list[tuple[torch.Tensor, dict]]:
    """The calibration batches entering block ``state.next_block``: hidden states (captured, or the spilled
    ones of a resumed run) with the keyword arguments every block takes (masks, position embeddings)."""
    with torch.no_grad():
        captured = capture_block_inputs(source.model, source.adapter, calib, calibration_batch(calib, run.options))
    if state.next_block == 0 or state.next_block == source.num_blocks:
        return captured
    hidden = state.inputs()
    if len(hidden) != len(captured) or any(h.shape != c.shape for h, (c, _) in zip(hidden, captured)):
        raise QuantkitError(f"the spilled activations in {state.folder} do not match the calibration batches")
    return [(h, kwargs) for h, (_, kwargs) in zip(hidden, captured)]


def _publish(source: StreamedModel, tokenizer, state: RunState, record: dict, output: Path) -> None:
    """Assemble the finished shards, the rest of the model's tensors and the side files at ``output``."""
    blocks = source.adapter.blocks + "."
    outer = {name: t.cpu() for name, t in plain_tensors(source.model, {}).items() if not name.startswith(blocks)}
    write_part(outer, state.checkpoint / OUTER_PART)
    staging = state.folder / "publish"
    if staging.exists():  # left by a run killed while publishing
        shutil.rmtree(staging)
    staging.mkdir()
    finish_parts(state.checkpoint, [OUTER_PART, *(block_part(i) for i in range(source.num_blocks))], staging)
    write_side_files(staging, source.model, tokenizer, native_config(source.model, state.layers, record))
    state.forget()  # a kill after this point reruns from scratch rather than find its output in the way
    publish_directory(staging, output)
