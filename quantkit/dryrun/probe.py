"""A timed probe on one block: the run's own steps up to the end of block 0 (outer weights, calibration windows,
the hidden states entering the blocks, the block's weights, its forward, statistics and solves), with the
process's resident memory before and at the peak of each."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.engine import EngineOptions, calibration_batch, capture_block_inputs, quantize_blocks
from quantkit.formats.base import QuantizedTensor
from quantkit.models.loading import float32_bytes
from quantkit.streaming.source import StreamedModel

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")
RESET_PEAK = "5"  # clear_refs: reset the peak resident set size (Linux 4.0+)


def _status_bytes(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def resident_bytes() -> int:
    """The process's resident set size now (0 where /proc is not there)."""
    return _status_bytes("VmRSS") if STATUS.is_file() else 0


def reset_peak() -> bool:
    """Start the peak resident size afresh; False where the system cannot (the peak then counts from the start)."""
    try:
        CLEAR_REFS.write_text(RESET_PEAK)
    except OSError:
        return False
    return True


def peak_bytes() -> int:
    """The peak resident set size since the start or the last :func:`reset_peak`."""
    return _status_bytes("VmHWM") if STATUS.is_file() else 0


def held_bytes(quantized: dict[str, QuantizedTensor]) -> int:
    """Bytes of the tensors the quantized layers hold in memory (a resident run keeps them to the end)."""
    return sum(value.numel() * value.element_size() for qt in quantized.values() for value in vars(qt).values()
               if isinstance(value, torch.Tensor))


@dataclass(frozen=True)
class Probe:
    """What the probe measured: seconds of each step, resident bytes at its marks, the quantized block's bytes."""

    setup_seconds: float  # outer weights, calibration windows and the hidden states entering block 0
    load_seconds: float  # block 0's weights from the shards
    block_seconds: float  # block 0: forward, statistics, solves, its outputs
    base_rss: int  # before anything is read (the process: Python, torch, the skeleton, the tokenizer)
    setup_rss: int  # after the set-up
    loaded_rss: int  # with block 0's weights
    peak_rss: int  # the peak while block 0 was quantized
    quantized_bytes: int  # what block 0's quantized layers hold


class _OneBlock:
    """The engine's block source for the probe: block 0 read from the shards, its results kept."""

    def __init__(self, source: StreamedModel) -> None:
        self.source, self.quantized, self.load_seconds = source, {}, 0.0

    def __len__(self) -> int:
        return 1

    def load(self, index: int) -> torch.nn.Module:
        start = time.perf_counter()
        block = self.source.load_block(index, torch.device("cpu"))
        self.load_seconds = time.perf_counter() - start
        return block

    def finish(self, index: int, quantized: dict[str, QuantizedTensor], outputs):
        self.quantized = quantized
        return outputs


def probe_block(source: StreamedModel, quantizer, scheme_for, calib: torch.Tensor | None,
                options: EngineOptions) -> Probe:
    """Run the quantization of block 0 of ``source`` as a run does and measure it; ``calib``: the windows, or
    None for a method without calibration."""
    base = resident_bytes()
    start = time.perf_counter()
    source.load_outer()
    inputs = None
    if calib is not None:
        with torch.no_grad():
            inputs = capture_block_inputs(source.model, source.adapter, calib, calibration_batch(calib, options))
    setup_seconds = time.perf_counter() - start
    setup = resident_bytes()
    blocks = _OneBlock(source)
    start = time.perf_counter()
    reset_peak()
    quantize_blocks(blocks, source.adapter, quantizer, scheme_for, inputs, options, "dry run: probe")
    seconds = time.perf_counter() - start - blocks.load_seconds
    peak = peak_bytes()
    loaded = setup + float32_bytes(source.block(0))
    held = held_bytes(blocks.quantized)
    source.release_block(0)
    return Probe(setup_seconds, blocks.load_seconds, seconds, base, setup, loaded, max(peak, loaded), held)
