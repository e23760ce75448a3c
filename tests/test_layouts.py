"""The layout registry: one entry per checkpoint layout, each counting, naming and decoding what it writes."""

from __future__ import annotations

import math

import pytest
import torch
from test_export_formats import CALIB, _config, quantize_tiny

import quantkit
from helpers_tokenizer import tiny_tokenizer
from quantkit.errors import QuantkitError
from quantkit.export.save import model_dtype, save_checkpoint
from quantkit.formats import ROLES
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.layouts import LAYOUTS, get_layout
from quantkit.quantizers import make_quantizer
from quantkit.runtime.loader import open_checked
from quantkit.schemes import CHECKPOINT_LAYOUTS, QuantScheme

CASES = [  # (layout, method, scheme, options)
    ("native", "gptq", QuantScheme(3, 32, True), {"act_order": True}),
    ("native", "spqr", QuantScheme(4, 16, False), {}),
    ("native", "rtn", QuantScheme(4, 16, True, "nvfp4"), {}),
    ("gptq", "gptq", QuantScheme(4, 16, True), {"act_order": True}),
    ("compressed-tensors", "rtn", QuantScheme(4, 16, False), {}),
    ("compressed-tensors", "rtn", QuantScheme(4, 32, True, "mxfp4"), {}),
]


def test_the_registry_holds_every_layout_the_options_name() -> None:
    assert tuple(LAYOUTS) == CHECKPOINT_LAYOUTS
    assert all(get_layout(name).name == name for name in CHECKPOINT_LAYOUTS)
    with pytest.raises(QuantkitError, match="unknown checkpoint layout 'awq'"):
        get_layout("awq")


@pytest.mark.parametrize(("layout", "method", "scheme", "options"), CASES)
def test_plans_count_name_and_size_exactly_what_was_written(tmp_path, layout, method, scheme, options) -> None:
    """Each stored layer's tensors: every one has a role, and the bytes the layout predicts before quantizing
    (from the quantizer's plan) are the bytes in the headers (SpQR: a lower bound, its outliers on top)."""
    model, quantized = quantize_tiny(method, scheme, **options)
    save_checkpoint(layout, tmp_path / "ckpt", model, tiny_tokenizer(), quantized, _config(method, options))
    checked = open_checked(tmp_path / "ckpt")
    assert checked.config.layout is get_layout(layout)
    plan = make_quantizer(method, **options).plan(scheme)
    for name, layer in checked.plans.items():
        assert set(layer.specs) <= set(layer.roles) and set(layer.roles.values()) <= set(ROLES)
        stored = sum(math.prod(shape) * dtype.itemsize for shape, dtype in layer.specs.values())
        predicted = get_layout(layout).nbytes(plan.meta(quantized[name].shape), quantized[name].shape, model_dtype(model))
        outlier_bytes = 4 * quantized[name].meta().get("outliers", 0)  # a column index and a value each
        assert predicted + outlier_bytes == stored


@pytest.mark.parametrize("layout", ["native", "gptq", "compressed-tensors"])
def test_loading_decodes_each_layer_once_and_serving_decodes_nothing(tmp_path, layout, monkeypatch) -> None:
    """The loader decodes a layer's stored tensors once; the kernel prepares its packing from that tensor, so
    neither it nor the first forward unpacks the stored tensors again."""
    model, quantized = quantize_tiny("rtn", QuantScheme(4, 32, True))
    save_checkpoint(layout, tmp_path / "ckpt", model, tiny_tokenizer(), quantized, _config("rtn", {}))
    calls = []
    rebuild = IntQuantizedTensor.from_tensors.__func__
    monkeypatch.setattr(IntQuantizedTensor, "from_tensors",
                        classmethod(lambda cls, *args: calls.append(1) or rebuild(cls, *args)))
    loaded = quantkit.load(tmp_path / "ckpt", kernel="auto")
    assert len(calls) == (len(quantized) if layout == "native" else 0)  # foreign layouts decode their own tensors
    calls.clear()
    with torch.no_grad():
        torch.testing.assert_close(loaded(CALIB).logits, model(CALIB).logits, rtol=0, atol=1e-4)
    assert calls == []
