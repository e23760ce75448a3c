"""The one data mover: calibration data through a model's blocks. :mod:`~quantkit.engine.sequential` quantizes
block by block; :mod:`~quantkit.engine.passes` offers the per-block hooks transforms training and allocation
measurements use."""

from quantkit.engine.sequential import (
    BlockSource,
    Calibrated,
    EngineOptions,
    block_devices,
    block_output,
    calibration_batch,
    capture_block_inputs,
    check_layers,
    linear_shapes,
    quantize_blocks,
    quantize_model,
)

__all__ = ["BlockSource", "Calibrated", "EngineOptions", "block_devices", "block_output", "calibration_batch",
           "capture_block_inputs", "check_layers", "linear_shapes", "quantize_blocks", "quantize_model"]
