"""Calibration data: token windows for post-training quantization."""

from quantkit.calib.sources import check_source, default_windows, load_calibration

__all__ = ["check_source", "default_windows", "load_calibration"]
