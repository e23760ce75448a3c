"""The Triton dequantize-GEMM kernel for SpQR's dense part, run on CPU by the Triton interpreter.

``TRITON_INTERPRET`` is set before anything here imports triton. It stays set for the rest of the session,
and if the kernel modules were already imported without it, they are reloaded so that their kernels are
interpreted.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from test_triton_int import assert_matches, import_without_triton, random_x  # noqa: E402

from quantkit.formats.packing import pack_rows, unpack_rows  # noqa: E402
from quantkit_kernels import triton_int, triton_spqr  # noqa: E402

if not triton_spqr.INTERPRETED:
    # triton_spqr's kernels call triton_int's helpers and re-export its INTERPRETED: reload both.
    importlib.reload(triton_int)
    triton_spqr = importlib.reload(triton_spqr)

K, N = 200, 100  # neither a multiple of BLOCK_K (64) nor of BLOCK_N (64)
STAT_GROUP = 16  # N is not a multiple of it either
MIN_SCALE = 1e-5


def make_layer(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    stat_group_size: int = STAT_GROUP,
    min_scale: float = MIN_SCALE,
    scale_zero_max: float = 1.0,
    seed: int = 0,
) -> dict:
    """Random SpQR dense part as :func:`triton_spqr.spqr_matmul` takes it (3-bit codes for the statistics).

    First-level scales ``ss * (cs - sz)`` are positive unless ``scale_zero_max`` exceeds 1.
    """
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if group_size == -1 else -(-k // group_size)
    blocks = -(-n // stat_group_size)

    def stats(low: float, high: float) -> torch.Tensor:
        return (low + (high - low) * torch.rand(groups, blocks, generator=gen)).half()

    def stat_codes(low: int) -> torch.Tensor:
        return torch.randint(low, 8, (groups, n), generator=gen, dtype=torch.uint8)

    layer = {
        "qweight": pack_rows(torch.randint(0, 2**bits, (n, k), generator=gen), bits),
        "scale_codes": stat_codes(0 if scale_zero_max > 1 else 1),
        "scale_scale": stats(0.002, 0.01),
        "scale_zero": stats(0.0, scale_zero_max),
        "zero_codes": None,
        "zero_scale": None,
        "zero_zero": None,
        "bits": bits,
        "group_size": group_size,
        "stat_group_size": stat_group_size,
        "symmetric": symmetric,
        "min_scale": min_scale,
    }
    if not symmetric:
        # Zeros scattered over (and a little beyond) the code range, generally not integers.
        layer.update(
            zero_codes=stat_codes(0), zero_scale=stats(0.1, 0.3) * 2**bits, zero_zero=stats(0.0, 2.0)
        )
    return layer


def spqr_dense_reference(
    in_features: int,
    qweight: torch.Tensor,
    scale_codes: torch.Tensor,
    scale_scale: torch.Tensor,
    scale_zero: torch.Tensor,
    zero_codes: torch.Tensor | None,
    zero_scale: torch.Tensor | None,
    zero_zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    stat_group_size: int,
    symmetric: bool,
    min_scale: float,
) -> torch.Tensor:
    """The float64 weight ``W [N, in_features]`` that the kernel's inputs dequantize to."""
    n, k = scale_codes.shape[1], in_features
    codes = unpack_rows(qweight, bits, k).double()

    def second_level(stat_codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``[G, N]`` statistics, each ``[G, R]`` scale/zero repeated over its block of rows."""
        scale = scale.double().repeat_interleave(stat_group_size, dim=1)[:, :n]
        zero = zero.double().repeat_interleave(stat_group_size, dim=1)[:, :n]
        return scale * (stat_codes.double() - zero)

    scales = second_level(scale_codes, scale_scale, scale_zero).clamp_min(min_scale)
    if symmetric:
        zeros = torch.full_like(scales, 2.0 ** (bits - 1))
    else:
        zeros = second_level(zero_codes, zero_scale, zero_zero)
    size = k if group_size == -1 else group_size
    column_scales = scales.repeat_interleave(size, dim=0)[:k].T  # [N, k]
    column_zeros = zeros.repeat_interleave(size, dim=0)[:k].T
    return column_scales * (codes - column_zeros)


def reference_output(x: torch.Tensor, layer: dict) -> torch.Tensor:
    return x.double() @ spqr_dense_reference(x.shape[-1], **layer).T


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [16, 32, 48, -1])  # 48 does not divide K
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 40])  # split-K and tiled
def test_bits_groups_zero_points(m: int, bits: int, group_size: int, symmetric: bool) -> None:
    layer = make_layer(N, K, bits, group_size, symmetric=symmetric, seed=bits * 1000 + group_size)
    x = random_x((m, K), torch.float32)
    assert_matches(triton_spqr.spqr_matmul(x, **layer), reference_output(x, layer), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_dtypes(m: int, dtype: torch.dtype) -> None:
    layer = make_layer(N, K, bits=4, group_size=48, seed=m)
    x = random_x((m, K), dtype)
    assert_matches(triton_spqr.spqr_matmul(x, **layer), reference_output(x, layer), dtype)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("m", [3, 40])
def test_scales_clamp_to_min_scale(m: int, symmetric: bool) -> None:
    layer = make_layer(N, K, 4, 32, symmetric=symmetric, min_scale=0.01, scale_zero_max=3.0, seed=m)
    raw = layer["scale_scale"].float().repeat_interleave(STAT_GROUP, dim=1)[:, :N] * (
        layer["scale_codes"].float() - layer["scale_zero"].float().repeat_interleave(STAT_GROUP, dim=1)[:, :N]
    )
    assert (raw <= 0).any() and (raw > 0.01).any()  # some scales clamp, others do not
    x = random_x((m, K), torch.float32)
    assert_matches(triton_spqr.spqr_matmul(x, **layer), reference_output(x, layer), torch.float32)


def test_leading_dims_and_strided_input() -> None:
    layer = make_layer(N, K, bits=8, group_size=32, symmetric=True)
    x = random_x((2, 3, K + 8), torch.float16)[..., 3 : K + 3]  # rows are not contiguous in memory
    y = triton_spqr.spqr_matmul(x, **layer)
    assert y.shape == (2, 3, N)
    assert_matches(y, reference_output(x, layer), torch.float16)


def test_empty_input() -> None:
    layer = make_layer(N, K, bits=4, group_size=32)
    assert triton_spqr.spqr_matmul(torch.empty(0, K), **layer).shape == (0, N)


def test_support() -> None:
    assert triton_spqr.INTERPRETED and triton_spqr.TRITON_AVAILABLE
    assert triton_spqr.is_supported(4, "cpu") and not triton_spqr.is_supported(3)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"bits": 3}, "bits"),
        ({"qweight": torch.zeros(N, 101, dtype=torch.int32)}, "qweight"),
        ({"qweight": torch.zeros(N, 100, dtype=torch.int64)}, "qweight"),
        ({"scale_codes": torch.zeros(6, N, dtype=torch.uint8)}, "groups"),
        ({"scale_codes": torch.zeros(7, N)}, "scale_codes"),
        ({"scale_scale": torch.zeros(7, 6).half()}, "scale_scale"),
        ({"zero_zero": torch.zeros(7, 7, 1).half()}, "zero_zero"),
        ({"zero_codes": None}, "needs"),
        ({"symmetric": True}, "None"),
        ({"stat_group_size": 0}, "group sizes"),
    ],
)
def test_bad_inputs_raise(change: dict, match: str) -> None:
    layer = make_layer(N, K, bits=4, group_size=32)  # 7 groups, 7 blocks of rows, 100 words per row
    with pytest.raises(ValueError, match=match):
        triton_spqr.spqr_matmul(torch.randn(2, K), **{**layer, **change})


def test_bad_activations_raise() -> None:
    layer = make_layer(N, K, bits=4, group_size=32)
    with pytest.raises(ValueError, match="activations"):
        triton_spqr.spqr_matmul(torch.ones(2, K, dtype=torch.int32), **layer)
    with pytest.raises(ValueError, match="groups"):
        triton_spqr.spqr_matmul(torch.randn(2, K + 32), **layer)


def test_import_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module (and the triton_int it builds on) still imports, and says no, when triton is missing."""
    module = import_without_triton(monkeypatch, triton_spqr.__file__, builds_on_int=True)
    assert not module.TRITON_AVAILABLE and not module.INTERPRETED
    assert not module.is_supported(4)
    with pytest.raises(RuntimeError, match="triton"):
        module.spqr_matmul(torch.randn(1, K), **make_layer(N, K, bits=4, group_size=32))


@pytest.mark.parametrize("bits,symmetric,act_order", [(3, False, True), (3, True, False), (2, True, True), (4, False, False)])
@pytest.mark.parametrize("m", [1, 33])
def test_quantlinear_serves_spqr_layers_with_triton_plus_outliers(bits: int, symmetric: bool, act_order: bool, m: int) -> None:
    """A real SpQR layer (outliers, permutation, 3-bit codes run as 4-bit) through QuantLinear's triton backend."""
    from quantkit.quantizers import make_quantizer
    from quantkit.quantizers.base import LayerStats
    from quantkit.runtime.quant_linear import QuantLinear
    from quantkit.schemes import QuantScheme

    gen = torch.Generator().manual_seed(bits)
    x_calib = torch.randn(512, 90, generator=gen) * torch.linspace(0.2, 3.0, 90)
    w = torch.randn(40, 90, generator=gen) * 0.05
    w[3, 7] = 1.0
    stats = LayerStats(hessian=2 * x_calib.double().T @ x_calib.double() / 512, tokens=512)
    qt = make_quantizer("spqr", act_order=act_order).quantize(w, stats, QuantScheme(bits, 16, symmetric))
    assert qt.outliers.count > 0
    layer = QuantLinear(90, 40, False, qt.meta(), torch.float32, backend="triton")
    for name, tensor in qt.to_tensors().items():
        setattr(layer, name, tensor)
    x = torch.randn(m, 90, generator=gen)
    assert layer.kernel_name(x.device, x.dtype) == "triton"
    torch.testing.assert_close(layer(x).double(), x.double() @ qt.dequantize(torch.float64).T, rtol=1e-5, atol=1e-5)
