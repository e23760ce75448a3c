"""Quantizing a model larger than memory: one decoder block at a time from the shards, each finished block
written out at once, activations spilled to disk, and a killed run resumed from its last finished block."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from quantkit.allocation.costs import LayerCost
from quantkit.diskspace import OutputError, check_space, write_errors
from quantkit.engine import (
    Calibrated,
    EngineOptions,
    block_devices,
    calibration_batch,
    capture_block_inputs,
    check_layers,
    linear_shapes,
    quantize_blocks,
)
from quantkit.errors import QuantkitError
from quantkit.export.atomic import publish_directory
from quantkit.export.safetensors_io import finish_parts, write_part
from quantkit.export.save import checkpoint_config
from quantkit.export.writer import estimated_bytes, plain_tensors, write_side_files
from quantkit.formats.base import QuantizedTensor
from quantkit.layouts.native import layer_records, layer_tensors, native_quantization_config
from quantkit.progress import stderr_console
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import QuantScheme
from quantkit.streaming.source import StreamedModel
from quantkit.streaming.state import RunState, block_part, tensor_digest, work_dir

if TYPE_CHECKING:
    from quantkit.api import CalibrationSpec

OUTER_PART = "part-outer.safetensors"
WHAT = "the checkpoint and the run's state"


class StreamedBlocks:
    """The engine's blocks read from the shards on their devices; each finished block goes to the run state
    (its shard and the hidden states after it) and its weights are dropped."""

    def __init__(self, source: StreamedModel, state: RunState, placement: list[torch.device],
                 dtype: torch.dtype, expert_tokens: dict[str, int]) -> None:
        self.source, self.state, self.placement, self.dtype = source, state, placement, dtype
        self.expert_tokens = expert_tokens  # the engine's count of routed tokens, filled in block by block

    def __len__(self) -> int:
        return self.source.num_blocks

    def load(self, index: int) -> torch.nn.Module:
        return self.source.load_block(index, self.placement[index])

    def finish(self, index: int, quantized: dict[str, QuantizedTensor],
               outputs: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
        prefix = f"{self.source.adapter.blocks}.{index}."
        local = {name.removeprefix(prefix): qt for name, qt in quantized.items()}
        stored = {**plain_tensors(self.source.block(index), local, self.dtype), **layer_tensors(local)}
        tensors = {prefix + name: t.cpu() for name, t in stored.items()}
        last = index == len(self) - 1
        routed = {name: n for name, n in self.expert_tokens.items() if name.startswith(prefix)}
        self.state.commit_block(index, tensors, layer_records(quantized), None if last else outputs, routed)
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
    dtype: torch.dtype = torch.float32  # of the tensors kept unquantized


def quantize_streamed(source: StreamedModel, tokenizer, run: StreamedRun, arguments: dict, output: Path,
                      record: dict, overwrite: bool = False) -> None:
    """Quantize ``source`` block by block into a native checkpoint at ``output`` (config.json recording
    ``record``), resuming the state a run with the same ``arguments`` and calibration windows left (and
    refusing, keeping that state, if they differ). Bad input found mid-run discards the state; any other
    failure (a crash, Ctrl-C, a full disk, an output another run published meanwhile without ``overwrite``)
    keeps it for the next run once a block is done. A run that does not fit on the disk is refused first."""
    check_layers(source.model, source.adapter, lambda _name: run.scheme, values=False)
    calib = _calibration(tokenizer, run) if run.quantizer.needs_calibration else None
    folder = work_dir(output)
    needed = max(0, _bytes_to_write(source, run, calib) - _bytes_written(folder))
    check_space(folder.parent, needed, WHAT)
    ranks = run.options.ranks
    state = RunState.open(output, arguments, ranks)
    try:
        if calib is not None:
            state.check_calibration(tensor_digest(calib))  # a refusal keeps the state for the right windows
        try:
            with write_errors(folder.parent, WHAT, needed):
                _quantize_and_publish(source, tokenizer, run, state, calib, output, record, overwrite)
        except OutputError:
            raise
        except QuantkitError:
            state.discard()
            raise
        state.discard()
    except OutputError as exc:
        if state.next_block == 0:
            state.discard()
            raise
        raise OutputError(f"{exc}; {_kept(state, source.num_blocks)}") from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"interrupted; rerun the same command to resume from {state.folder}") from None
    finally:
        state.release()


def _kept(state: RunState, num_blocks: int) -> str:
    """What a rerun of a run stopped by its output finds in ``state``."""
    if state.next_block == num_blocks:
        return f"all {num_blocks} blocks are kept in {state.folder}: rerun the same command to publish them"
    return f"the {state.next_block} finished blocks are kept in {state.folder}: rerun the same command to resume"


def _quantize_and_publish(source: StreamedModel, tokenizer, run: StreamedRun, state: RunState,
                          calib: torch.Tensor | None, output: Path, record: dict, overwrite: bool) -> None:
    if state.next_block == source.num_blocks:
        stderr_console.print(f"all {source.num_blocks} blocks are done in {state.folder}; publishing")
    elif state.next_block:
        stderr_console.print(f"resuming at block {state.next_block + 1} of {source.num_blocks} from {state.folder}")
    devices = run.options.devices or (torch.device("cpu"),)
    source.load_outer()
    inputs = None if calib is None else _block_inputs(source, calib, run, state)
    torch.manual_seed(run.seed)
    run.options.expert_tokens.update(state.expert_tokens)  # of the blocks a resumed run finished before
    blocks = StreamedBlocks(source, state, block_devices(source.num_blocks, devices), run.dtype,
                            run.options.expert_tokens)
    quantize_blocks(blocks, source.adapter, run.quantizer, lambda _name: run.scheme, inputs, run.options, run.label,
                    start=state.next_block)
    if not run.options.ranks.writer:
        return
    record["experts"] = run.options.experts_record()
    _publish(source, tokenizer, state, record, output, overwrite, run.dtype)


def _bytes_to_write(source: StreamedModel, run: StreamedRun, calib: torch.Tensor | None) -> int:
    """What a run writes in all, as far as it is known before it starts: the checkpoint (quantized linears at
    the bytes their scheme fixes, a lower bound where outliers add more) and the hidden states entering two
    blocks (spilled at once while one block hands over to the next)."""
    cost = LayerCost()
    layer_bytes = {name: cost(run.quantizer.plan(run.scheme).meta(shape), shape)
                   for name, shape in linear_shapes(source.model, source.adapter).items()}
    total = estimated_bytes(source.model, layer_bytes, run.dtype)
    if calib is not None:
        total += spilled_bytes(calib, source.model.config.hidden_size)
    return total


def spilled_bytes(calib: torch.Tensor, hidden_size: int) -> int:
    """What a run spills of ``calib``'s hidden states at most: those entering two blocks, in float32 (written at
    once while one block hands over to the next)."""
    return 2 * calib.numel() * hidden_size * torch.float32.itemsize


def _bytes_written(folder: Path) -> int:
    """Bytes of finished block shards a killed run left in its work directory ``folder``."""
    return sum(part.stat().st_size for part in (folder / "checkpoint").glob("part-*.safetensors"))


def _calibration(tokenizer, run: StreamedRun) -> torch.Tensor:
    from quantkit.calib import load_calibration
    from quantkit.calib.sources import MODEL_SAMPLED

    spec = run.calibration
    if spec.source in MODEL_SAMPLED:
        raise QuantkitError(f"{spec.source} calibration samples from the whole model; --offload disk needs a text source")
    return load_calibration(spec.source, tokenizer, spec.nsamples, spec.seqlen, run.seed, data_dir=spec.data_dir)


def _block_inputs(source: StreamedModel, calib: torch.Tensor, run: StreamedRun, state: RunState) -> Calibrated:
    """The calibration batches entering block ``state.next_block``: hidden states (captured, or the spilled
    ones of a resumed run) with the keyword arguments of every block (masks, position embeddings)."""
    calib = run.options.ranks.windows(calib)
    with torch.no_grad():
        captured = capture_block_inputs(source.model, source.adapter, calib, calibration_batch(calib, run.options))
    if state.next_block == 0 or state.next_block == source.num_blocks:
        return captured
    hidden = state.inputs()
    if len(hidden) != len(captured.hidden) or any(h.shape != c.shape for h, c in zip(hidden, captured.hidden)):
        raise QuantkitError(f"the spilled activations in {state.folder} do not match the calibration batches")
    captured.hidden = hidden
    return captured


def _publish(source: StreamedModel, tokenizer, state: RunState, record: dict, output: Path,
             overwrite: bool, dtype: torch.dtype) -> None:
    """Assemble the finished shards, the rest of the model's tensors (float ones in ``dtype``) and the side
    files at ``output``; an output another run published meanwhile is replaced only with ``overwrite``."""
    blocks = source.adapter.blocks + "."
    outer = {name: t.cpu() for name, t in plain_tensors(source.model, {}, dtype).items() if not name.startswith(blocks)}
    write_part(outer, state.checkpoint / OUTER_PART)
    staging = state.folder / "publish"
    if staging.exists():  # left by a run killed while publishing
        shutil.rmtree(staging)
    try:
        staging.mkdir()
        finish_parts(state.checkpoint, [OUTER_PART, *(block_part(i) for i in range(source.num_blocks))], staging)
        config = checkpoint_config(source.model, native_quantization_config(state.layers, record), dtype)
        write_side_files(staging, source.model, tokenizer, config)
        publish_directory(staging, output, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
