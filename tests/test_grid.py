"""The integer grid and IntQuantizedTensor against float64 references written independently here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quantkit.formats.grid import fit_grid
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import LayerStats
from quantkit.schemes import QuantScheme


def reference_rtn(w: np.ndarray, bits: int, group: int, sym: bool) -> np.ndarray:
    """GPTQ's min-max grid per row and group, in float64, scale stored as float16."""
    maxq = 2**bits - 1
    out = np.empty_like(w, dtype=np.float64)
    size = w.shape[1] if group == -1 else group
    for start in range(0, w.shape[1], size):
        block = w[:, start : start + size].astype(np.float64)
        for r in range(block.shape[0]):
            lo, hi = min(block[r].min(), 0.0), max(block[r].max(), 0.0)
            if sym:
                hi = max(abs(lo), hi)
                lo = -hi
            if lo == 0 and hi == 0:
                lo, hi = -1.0, 1.0
            scale = float(np.float16(np.float32((hi - lo) / maxq)))
            zero = (maxq + 1) // 2 if sym else min(max(np.round(-lo / scale), 0), maxq)
            q = np.clip(np.round(block[r] / scale) + zero, 0, maxq)
            out[r, start : start + size] = scale * (q - zero)
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [16, 24, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_rtn_matches_float64_reference(bits: int, group: int, sym: bool) -> None:
    gen = torch.Generator().manual_seed(bits + group)
    w = torch.randn(12, 72, generator=gen) * 0.05
    w[3] = 0.0  # an all-zero row takes the [-1, 1] range
    w[4] = w[4].abs()  # all positive: the range still includes 0
    qt = make_quantizer("rtn").quantize(w, LayerStats(), QuantScheme(bits, group, sym))
    expected = reference_rtn(w.numpy(), bits, group, sym)
    np.testing.assert_allclose(qt.dequantize().double().numpy(), expected, rtol=0, atol=1e-7)


def test_symmetric_grid_uses_gptq_unsigned_convention() -> None:
    scale, zero = fit_grid(torch.tensor([[-1.0, 0.5]]), QuantScheme(4, -1, True))
    assert zero.item() == 8
    assert scale.item() == pytest.approx(2 / 15, rel=1e-3)


def test_mse_search_never_increases_the_error() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=gen)
    w[:, 0] *= 20  # an outlier per row makes clipping pay off
    scheme = QuantScheme(3, -1, False)
    plain = make_quantizer("rtn").quantize(w, LayerStats(), scheme).dequantize()
    clipped = make_quantizer("rtn", mse=True).quantize(w, LayerStats(), scheme).dequantize()
    err = lambda q: (q - w).abs().pow(2.4).sum(dim=1)  # noqa: E731
    assert torch.all(err(clipped) <= err(plain) + 1e-4)
    assert err(clipped).sum() < 0.9 * err(plain).sum()


def test_dequantize_with_g_idx_matches_per_column_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (5, 12), generator=gen).to(torch.uint8)
    scales = torch.rand(5, 3, generator=gen).to(torch.float16)
    zeros = torch.randint(0, 16, (5, 3), generator=gen).to(torch.uint8)
    g_idx = torch.tensor([2, 0, 1, 1, 0, 2, 2, 0, 1, 1, 0, 2], dtype=torch.int32)
    qt = IntQuantizedTensor(codes, scales, zeros, QuantScheme(4, 4, False), g_idx)
    expected = torch.empty(5, 12, dtype=torch.float64)
    for r in range(5):
        for c in range(12):
            g = int(g_idx[c])
            expected[r, c] = float(scales[r, g]) * (int(codes[r, c]) - int(zeros[r, g]))
    torch.testing.assert_close(qt.dequantize().double(), expected, rtol=0, atol=1e-6)
