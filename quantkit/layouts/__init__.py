"""The one disk contract: each checkpoint layout in a module of its own, behind one registry.

Adding a layout is adding a module with a :class:`~quantkit.layouts.base.Layout` subclass and its entry here.
"""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.layouts.base import Layout
from quantkit.layouts.compressed_tensors import CompressedTensorsLayout
from quantkit.layouts.gguf import GGUFLayout
from quantkit.layouts.gptq import GPTQLayout
from quantkit.layouts.native import NativeLayout

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (NativeLayout(), GPTQLayout(), CompressedTensorsLayout(), GGUFLayout())}


def get_layout(name: str) -> Layout:
    """The layout called ``name``; a one-line refusal of an unknown one."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise QuantkitError(f"unknown checkpoint layout {name!r}; choose one of {', '.join(LAYOUTS)}") from None


def stored_layout(folder: Path, qc: object) -> Layout:
    """The layout a stored quantization config is written in (by its ``quant_method``), its config checked."""
    if not isinstance(qc, dict):
        raise QuantkitError(f"corrupt quantization_config in {folder / 'config.json'}: {type(qc).__name__} "
                            f"{json.dumps(qc)[:40]}, not an object")
    method = qc.get("quant_method")
    by_method = {layout.quant_method: layout for layout in LAYOUTS.values()}
    if not isinstance(method, str) or method not in by_method:
        raise QuantkitError(f"{folder} is quantized with quant_method {method!r}, which quantkit does not load "
                            f"(it loads {', '.join(by_method)})")
    layout = by_method[method]
    layout.check_config(folder, qc)
    return layout


__all__ = ["LAYOUTS", "Layout", "get_layout", "stored_layout"]
