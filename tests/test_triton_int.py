"""The Triton dequantize-GEMM kernels for packed integer weights, run on CPU by the Triton interpreter.

``TRITON_INTERPRET`` is set before anything here imports triton. It stays set for the rest of the session,
and if the kernel module was already imported without it, it is reloaded so that its kernels are interpreted.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import quantkit_kernels  # noqa: E402
from quantkit.formats.packing import pack_rows  # noqa: E402
from quantkit_kernels import triton_int  # noqa: E402

if not triton_int.INTERPRETED:
    triton_int = importlib.reload(triton_int)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
K, N = 200, 100  # neither a multiple of BLOCK_K (64) nor of BLOCK_N (64)


def make_layer(
    n: int,
    k: int,
    bits: int,
    group_size: int,
    *,
    symmetric: bool = False,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> tuple[dict, torch.Tensor]:
    """Random codes/scales/zeros packed as quantkit stores them, and the float64 weight they dequantize to."""
    gen = torch.Generator().manual_seed(seed)
    size = k if group_size == -1 else group_size
    groups = -(-k // size)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    if symmetric:
        zeros = torch.full((n, groups), 2 ** (bits - 1))
    else:
        zeros = torch.randint(0, 2**bits, (n, groups), generator=gen)
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 0.01).to(scale_dtype)
    if act_order:
        # GPTQ act-order: columns are quantized in permuted order, so g_idx[perm[i]] = i // group_size.
        perm = torch.randperm(k, generator=gen)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // size).to(torch.int32)
        column_group = g_idx.long()
    else:
        g_idx = None
        column_group = torch.arange(k) // size
    w_ref = scales.double()[:, column_group] * (codes.double() - zeros.double()[:, column_group])
    packed = {
        "qweight": pack_rows(codes, bits),
        "scales": scales,
        "qzeros": pack_rows(zeros, bits),
        "g_idx": g_idx,
        "bits": bits,
        "group_size": group_size,
    }
    return packed, w_ref


def random_x(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def assert_matches(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Relative error within the dtype's tolerance overall, and no element (e.g. one never written) far off."""
    assert y.dtype == dtype and y.shape == ref.shape
    assert torch.isfinite(y).all()
    diff = y.double() - ref
    tol = TOLERANCE[dtype]
    assert (diff.norm() / ref.norm()).item() < tol
    rms = ref.norm().item() / ref.numel() ** 0.5
    assert diff.abs().max().item() < 10 * tol * rms


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 7, 16, 17, 33, 130])
def test_shapes_and_dtypes(m: int, dtype: torch.dtype) -> None:
    layer, w_ref = make_layer(N, K, bits=4, group_size=32)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(dtype)
    x = random_x((m, K), dtype)
    y = triton_int.int_matmul(x, **layer, bias=bias)
    assert_matches(y, x.double() @ w_ref.T + bias.double(), dtype)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [3, 40])
def test_bits_groups_zero_points(m: int, bits: int, group_size: int, symmetric: bool) -> None:
    layer, w_ref = make_layer(N, K, bits, group_size, symmetric=symmetric, seed=bits * 1000 + group_size)
    x = random_x((m, K), torch.float32)
    assert_matches(triton_int.int_matmul(x, **layer), x.double() @ w_ref.T, torch.float32)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("m", [1, 40])
def test_act_order(m: int, bits: int, group_size: int) -> None:
    layer, w_ref = make_layer(N, K, bits, group_size, act_order=True, seed=bits + group_size)
    x = random_x((m, K), torch.float16)
    assert_matches(triton_int.int_matmul(x, **layer), x.double() @ w_ref.T, torch.float16)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_scale_dtypes(scale_dtype: torch.dtype) -> None:
    layer, w_ref = make_layer(N, K, bits=4, group_size=64, scale_dtype=scale_dtype)
    x = random_x((5, K), torch.float16)
    assert_matches(triton_int.int_matmul(x, **layer), x.double() @ w_ref.T, torch.float16)


@pytest.mark.parametrize("rows", [3, 9])
def test_leading_dims_and_strided_input(rows: int) -> None:
    layer, w_ref = make_layer(N, K, bits=8, group_size=64)
    x = random_x((2, rows, K + 8), torch.float32)[..., 3 : K + 3]  # rows are not contiguous in memory
    y = triton_int.int_matmul(x, **layer)
    assert y.shape == (2, rows, N)
    assert_matches(y, x.double() @ w_ref.T, torch.float32)


def test_empty_input() -> None:
    layer, _ = make_layer(N, K, bits=4, group_size=32)
    assert triton_int.int_matmul(torch.empty(0, K), **layer).shape == (0, N)


def test_support_and_errors() -> None:
    assert triton_int.INTERPRETED
    assert triton_int.is_supported(4, "cpu") and triton_int.is_supported(2) and triton_int.is_supported(8)
    assert not triton_int.is_supported(3)
    layer, _ = make_layer(N, K, bits=4, group_size=32)
    with pytest.raises(ValueError, match="bits"):
        triton_int.int_matmul(torch.randn(2, K), **{**layer, "bits": 3})
    with pytest.raises(ValueError, match="do not match"):
        triton_int.int_matmul(torch.randn(2, K + 32), **layer)


def import_without_triton(monkeypatch: pytest.MonkeyPatch, module_file: str, builds_on_int: bool = False):
    """A fresh copy of a kernel module imported as if triton were not installed (triton_int too, when the
    module builds on it)."""
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    if builds_on_int:
        monkeypatch.delitem(sys.modules, "quantkit_kernels.triton_int")
        monkeypatch.delattr(quantkit_kernels, "triton_int")
    spec = importlib.util.spec_from_file_location(f"{Path(module_file).stem}_without_triton", module_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module still imports (and says no) when triton is missing."""
    module = import_without_triton(monkeypatch, triton_int.__file__)
    assert not module.TRITON_AVAILABLE and not module.INTERPRETED
    assert not module.is_supported(4)
    layer, _ = make_layer(N, K, bits=4, group_size=32)
    with pytest.raises(RuntimeError, match="triton"):
        module.int_matmul(torch.randn(1, K), **layer)


@pytest.mark.parametrize("bits,act_order", [(4, True), (8, False), (2, False)])
def test_quant_linear_serves_through_triton(bits: int, act_order: bool) -> None:
    """QuantLinear's ``triton`` backend (interpreted here) agrees with its ``dequant`` reference."""
    from quantkit.formats.intgrid import IntQuantizedTensor
    from quantkit.runtime.quant_linear import QuantLinear
    from quantkit.schemes import QuantScheme

    gen = torch.Generator().manual_seed(bits)
    scheme = QuantScheme(bits, 32, symmetric=False)
    g_idx = None
    if act_order:
        g_idx = torch.empty(96, dtype=torch.int32)
        g_idx[torch.randperm(96, generator=gen)] = (torch.arange(96) // 32).to(torch.int32)
    qt = IntQuantizedTensor(torch.randint(0, 2**bits, (40, 96), generator=gen, dtype=torch.uint8),
                            (torch.rand(40, 3, generator=gen) * 0.05 + 0.01).half(),
                            torch.randint(0, 2**bits, (40, 3), generator=gen, dtype=torch.uint8), scheme, g_idx)
    layers = {}
    for backend in ("triton", "dequant"):
        layers[backend] = QuantLinear(96, 40, False, qt.meta(), torch.float32, backend=backend)
        for name, tensor in qt.to_tensors().items():
            setattr(layers[backend], name, tensor)
    x = torch.randn(2, 5, 96, generator=gen)
    assert layers["triton"].kernel_name(x.device, x.dtype) == "triton"
    torch.testing.assert_close(layers["triton"](x), layers["dequant"](x), rtol=1e-5, atol=1e-5)
