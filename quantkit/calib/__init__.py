"""Calibration data: token windows for post-training quantization."""

from quantkit.calib.sources import load_calibration

__all__ = ["load_calibration"]
