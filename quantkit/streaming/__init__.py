"""Quantization of models larger than memory: block-by-block streaming from safetensors shards, per-block
writes, activations spilled to disk, and resumption of a killed run."""

from quantkit.streaming.run import StreamedRun, quantize_streamed
from quantkit.streaming.source import StreamedModel

__all__ = ["StreamedModel", "StreamedRun", "quantize_streamed"]
