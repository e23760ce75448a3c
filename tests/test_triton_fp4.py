"""The Triton dequantize-GEMM kernel for block-scaled FP4 (E2M1) weights, run on CPU under the interpreter.

``TRITON_INTERPRET`` is set before anything here imports triton. It stays set for the rest of the session,
and if the kernel modules were already imported without it, they are reloaded so that their kernels are
interpreted. The references decode the weights independently of the kernel, in float64 from the codes.
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

from quantkit_kernels import triton_fp4, triton_int  # noqa: E402

if not triton_fp4.INTERPRETED:
    # triton_fp4's kernel calls triton_int's helpers and re-exports its INTERPRETED: reload both.
    importlib.reload(triton_int)
    triton_fp4 = importlib.reload(triton_fp4)

K, N = 200, 100  # K is a multiple of neither the block sizes (16, 32) nor BLOCK_K (64); N not of BLOCK_N
ODD_K = 75
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=torch.float64)
E4M3_BYTES = [b for b in range(256) if b & 0x7F != 0x7F]  # all but the two NaNs
E8M0_BYTES = list(range(255))  # all but the NaN
# (scale_format, block_size, with a global scale)
FORMATS = [
    ("e8m0", 32, False),
    ("e4m3", 16, False),
    ("e4m3", 16, True),
    ("fp16", 24, False),
    ("fp16", 16, True),
]
FORMAT_IDS = [f"{fmt}-b{size}{'-gs' if gs else ''}" for fmt, size, gs in FORMATS]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, ceil(K/2)]``: code ``k`` in byte ``k // 2``, in the low nibble when ``k`` is even."""
    padded = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2))
    return padded[:, 0::2] | (padded[:, 1::2] << 4)


def e2m1(codes: torch.Tensor) -> torch.Tensor:
    """float64 values of E2M1 codes: bit 3 the sign, bits 0-2 an index into the magnitudes."""
    sign = 1.0 - 2.0 * ((codes >> 3) & 1).double()
    return sign * E2M1[(codes & 7).long()]


def decode_scales(scales: torch.Tensor, scale_format: str) -> torch.Tensor:
    """float64 block scales from their stored form."""
    if scale_format == "e8m0":
        return 2.0 ** (scales.double() - 127)
    if scale_format == "e4m3":
        return scales.view(torch.float8_e4m3fn).double()
    return scales.double()


def make_layer(
    n: int,
    k: int,
    scale_format: str,
    block_size: int,
    *,
    global_scale: bool = False,
    scale_bytes: list[int] | None = None,
    seed: int = 0,
) -> tuple[dict, torch.Tensor]:
    """Random FP4 weights as :func:`triton_fp4.fp4_matmul` takes them, and their uint8 codes ``[n, k]``.

    All 16 codes occur. With ``scale_bytes`` the (uint8) scales cycle through those bytes in random order.
    """
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    codes.view(-1)[:16] = torch.arange(16, dtype=torch.uint8)
    shape = (n, -(-k // block_size))
    if scale_bytes is not None:
        pool = torch.tensor(scale_bytes, dtype=torch.uint8)
        scales = pool[torch.randperm(len(pool), generator=gen)].repeat(-(-(shape[0] * shape[1]) // len(pool)))
        scales = scales[: shape[0] * shape[1]].reshape(shape)
    elif scale_format == "e8m0":
        scales = torch.randint(121, 131, shape, generator=gen, dtype=torch.uint8)  # 2**-6 .. 2**3
    elif scale_format == "e4m3":
        # Exponent fields 4..11 (magnitudes 2**-3 .. 30), any mantissa, either sign.
        bytes_ = torch.randint(0x20, 0x60, shape, generator=gen) | (
            torch.randint(0, 2, shape, generator=gen) << 7
        )
        scales = bytes_.to(torch.uint8)
    else:
        scales = (torch.rand(shape, generator=gen) * 0.05 + 0.01).half()
    layer = {
        "packed": pack_nibbles(codes),
        "scales": scales,
        "global_scale": torch.tensor([37.3]) if global_scale else None,  # not a power of two: it rounds
        "block_size": block_size,
        "scale_format": scale_format,
    }
    return layer, codes


def block_scales(layer: dict, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The per-column scales ``[N, k]`` in ``dtype``, divided by the global scale in that dtype."""
    scales = decode_scales(layer["scales"], layer["scale_format"]).to(dtype)
    if layer["global_scale"] is not None:
        scales = scales / layer["global_scale"].to(dtype)
    return scales.repeat_interleave(layer["block_size"], dim=1)[:, :k]


def reference_weight(layer: dict, codes: torch.Tensor) -> torch.Tensor:
    """The float64 weight ``W [N, K]``."""
    return e2m1(codes) * block_scales(layer, codes.shape[1], torch.float64)


def float32_weight(layer: dict, codes: torch.Tensor) -> torch.Tensor:
    """The weight as the kernel computes it: float32 scale (over the global scale) times the E2M1 value."""
    return e2m1(codes).float() * block_scales(layer, codes.shape[1], torch.float32)


def weight_from_kernel(layer: dict, k: int) -> torch.Tensor:
    """``W [N, k]`` read back through the kernel as ``I @ W.T`` (exact in float32: one nonzero per sum)."""
    return triton_fp4.fp4_matmul(torch.eye(k), **layer).T


@pytest.mark.parametrize("k", [K, ODD_K])
@pytest.mark.parametrize("m", [1, 5, 40])  # split-K, split-K, tiled
@pytest.mark.parametrize("scale_format,block_size,global_scale", FORMATS, ids=FORMAT_IDS)
def test_scale_formats_float32(
    scale_format: str, block_size: int, global_scale: bool, m: int, k: int
) -> None:
    layer, codes = make_layer(N, k, scale_format, block_size, global_scale=global_scale, seed=m + k)
    x = random_x((m, k), torch.float32)
    y = triton_fp4.fp4_matmul(x, **layer)
    assert_matches(y, x.double() @ reference_weight(layer, codes).T, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 40])
@pytest.mark.parametrize("scale_format,block_size,global_scale", FORMATS[::2], ids=FORMAT_IDS[::2])
def test_half_dtypes(
    scale_format: str, block_size: int, global_scale: bool, m: int, dtype: torch.dtype
) -> None:
    layer, codes = make_layer(N, K, scale_format, block_size, global_scale=global_scale, seed=m)
    x = random_x((m, K), dtype)
    y = triton_fp4.fp4_matmul(x, **layer)
    w = reference_weight(layer, codes)
    ref = x.double() @ w.T
    assert_matches(y, ref, dtype)
    # Elementwise: rounding a weight to x's dtype moves it by under an ulp (the interpreter truncates to
    # bfloat16 where GPUs round to nearest), rounding y moves it by under another, float32 sums add little.
    eps = torch.finfo(dtype).eps
    bound = eps * ref.abs() + (eps + 1e-5) * (x.double().abs() @ w.abs().T)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize(
    "scale_format,block_size,global_scale,scale_bytes",
    [
        ("e4m3", 16, False, E4M3_BYTES),
        ("e4m3", 16, True, E4M3_BYTES),
        ("e8m0", 32, False, E8M0_BYTES),
        ("fp16", 16, True, None),
    ],
    ids=["e4m3", "e4m3-gs", "e8m0", "fp16-gs"],
)
def test_every_scale_byte_bit_exact(
    scale_format: str, block_size: int, global_scale: bool, scale_bytes: list[int] | None
) -> None:
    """With every non-NaN scale byte, random codes dequantize exactly as torch computes them in float32."""
    k = 255  # odd; 255 rows of x take the tiled path
    n = block_size  # n * ceil(k / block_size) = 256 scales: every byte at least once
    layer, codes = make_layer(
        n, k, scale_format, block_size, global_scale=global_scale, scale_bytes=scale_bytes
    )
    if scale_bytes is not None:
        assert set(layer["scales"].view(-1).tolist()) == set(scale_bytes)
    if scale_format == "e8m0":
        # 4 * 2**126 overflows float32: magnitudes up to 1.5 only with the largest scales.
        huge = (layer["scales"] >= 253).repeat_interleave(block_size, dim=1)[:, :k]
        codes = torch.where(huge, codes & 0b1011, codes)
        layer["packed"] = pack_nibbles(codes)
    expected = float32_weight(layer, codes)
    assert torch.isfinite(expected).all()
    w = weight_from_kernel(layer, k)
    assert torch.equal(w, expected)
    if not global_scale:
        assert torch.equal(w.double(), reference_weight(layer, codes))
    if scale_format != "e8m0":  # sums of weights scaled by up to 2**127 overflow float32
        x = random_x((3, k), torch.float32)  # split-K path, same weights
        y = triton_fp4.fp4_matmul(x, **layer)
        assert_matches(y, x.double() @ reference_weight(layer, codes).T, torch.float32)


@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("scale_format,block_size,global_scale", FORMATS, ids=FORMAT_IDS)
def test_float32_matches_torch(scale_format: str, block_size: int, global_scale: bool, m: int) -> None:
    layer, codes = make_layer(N, K, scale_format, block_size, global_scale=global_scale, seed=7)
    x = random_x((m, K), torch.float32)
    ref = x @ float32_weight(layer, codes).T
    y = triton_fp4.fp4_matmul(x, **layer)
    assert ((y - ref).norm() / ref.norm()).item() < 1e-5
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("rows", [3, 20])  # 6 rows take the small-M launch, 40 the tiled one
def test_bias_leading_dims_and_strides(rows: int) -> None:
    layer, codes = make_layer(N, ODD_K, "e4m3", 16, global_scale=True)
    # Packed bytes, scales and activations that are not contiguous in memory.
    layer["scales"] = layer["scales"].T.contiguous().T
    wide = torch.zeros(N, 50, dtype=torch.uint8)
    wide[:, 5 : 5 + layer["packed"].shape[1]] = layer["packed"]
    layer["packed"] = wide[:, 5 : 5 + layer["packed"].shape[1]]
    x = random_x((2, rows, ODD_K + 8), torch.float32)[..., 3 : ODD_K + 3]
    bias = torch.randn(N, generator=torch.Generator().manual_seed(2))
    y = triton_fp4.fp4_matmul(x, **layer, bias=bias)
    assert y.shape == (2, rows, N)
    assert_matches(y, x.double() @ reference_weight(layer, codes).T + bias.double(), torch.float32)


def test_bias_half() -> None:
    """K split in two: only one of the slices adds the bias."""
    layer, codes = make_layer(N, K, "e8m0", 32)
    x = random_x((4, K), torch.float16)
    bias = torch.randn(N, generator=torch.Generator().manual_seed(3)).half()
    y = triton_fp4.fp4_matmul(x, **layer, bias=bias)
    assert_matches(y, x.double() @ reference_weight(layer, codes).T + bias.double(), torch.float16)


def test_empty_input() -> None:
    layer, _ = make_layer(N, K, "e8m0", 32)
    assert triton_fp4.fp4_matmul(torch.empty(0, K), **layer).shape == (0, N)


def test_support() -> None:
    assert triton_fp4.INTERPRETED and triton_fp4.TRITON_AVAILABLE
    assert triton_fp4.is_supported("cpu") and triton_fp4.is_supported()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"packed": torch.zeros(N, 99, dtype=torch.uint8)}, "packed"),
        ({"packed": torch.zeros(N, 100, dtype=torch.int32)}, "packed"),
        ({"packed": torch.zeros(N * 100, dtype=torch.uint8)}, "packed"),
        ({"scales": torch.zeros(N, 12, dtype=torch.uint8)}, r"scales must have shape \(100, 13\)"),
        ({"scales": torch.zeros(N + 1, 13, dtype=torch.uint8)}, "scales must have shape"),
        ({"scales": torch.zeros(N, 13)}, "e4m3 scales must be torch.uint8"),
        ({"scales": torch.zeros(N, 13, dtype=torch.float8_e4m3fn)}, "view float8"),
        ({"scale_format": "fp16"}, "fp16 scales must be"),
        ({"scale_format": "nvfp4"}, "unknown scale_format"),
        ({"block_size": 0}, "block_size"),
        ({"global_scale": torch.tensor([2.0], dtype=torch.float16)}, "global_scale"),
        ({"global_scale": torch.ones(2)}, "global_scale"),
        ({"bias": torch.zeros(N + 1)}, "bias"),
    ],
)
def test_bad_inputs_raise(change: dict, match: str) -> None:
    layer, _ = make_layer(N, K, "e4m3", 16)  # 13 blocks of 16 columns, 100 bytes per row
    with pytest.raises(ValueError, match=match):
        triton_fp4.fp4_matmul(torch.randn(2, K), **{**layer, **change})


def test_bad_activations_raise() -> None:
    layer, _ = make_layer(N, K, "e4m3", 16)
    with pytest.raises(ValueError, match="activations"):
        triton_fp4.fp4_matmul(torch.ones(2, K, dtype=torch.int32), **layer)
    with pytest.raises(ValueError, match="packed"):
        triton_fp4.fp4_matmul(torch.randn(2, K + 2), **layer)


def test_matches_compressed_tensors_layout() -> None:
    """compressed-tensors unpacks the same codes and MX scales to what the kernel dequantizes."""
    helpers = pytest.importorskip("compressed_tensors.compressors.nvfp4.helpers")
    mx_utils = pytest.importorskip("compressed_tensors.compressors.mx_utils")
    layer, codes = make_layer(32, 128, "e8m0", 32, scale_bytes=list(range(100, 150)))
    unpacked = helpers.unpack_fp4_from_uint8(layer["packed"], 32, 128, dtype=torch.float32)
    assert torch.equal(unpacked.double(), e2m1(codes))
    scales = mx_utils.decompress_mx_scale(layer["scales"]).float().repeat_interleave(32, dim=1)
    assert torch.equal(weight_from_kernel(layer, 128), unpacked * scales)


def test_import_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module (and the triton_int it builds on) still imports, and says no, when triton is missing."""
    module = import_without_triton(monkeypatch, triton_fp4.__file__, builds_on_int=True)
    assert not module.TRITON_AVAILABLE and not module.INTERPRETED
    assert not module.is_supported()
    layer, _ = make_layer(N, K, "e8m0", 32)
    with pytest.raises(RuntimeError, match="triton"):
        module.fp4_matmul(torch.randn(1, K), **layer)


@pytest.mark.parametrize("fmt,group_size", [("nvfp4", 16), ("mxfp4", 32), ("fp4", 24)])
@pytest.mark.parametrize("m", [1, 33])
def test_quantlinear_serves_fp4_layers_with_triton(fmt: str, group_size: int, m: int) -> None:
    """A quantized FP4 layer (a partial last block) through QuantLinear's triton and cpu backends."""
    from quantkit.quantizers import make_quantizer
    from quantkit.quantizers.base import LayerStats
    from quantkit.runtime.quant_linear import QuantLinear
    from quantkit.schemes import QuantScheme

    gen = torch.Generator().manual_seed(m)
    w = torch.randn(40, 90, generator=gen) * 0.05
    qt = make_quantizer("rtn").quantize(w, LayerStats(), QuantScheme(4, group_size, True, fmt))
    x = torch.randn(m, 90, generator=gen)
    for backend in ("triton", "cpu"):
        layer = QuantLinear(90, 40, False, qt.meta(), torch.float32, backend=backend)
        for name, tensor in qt.to_tensors().items():
            setattr(layer, name, tensor)
        assert layer.kernel_name(x.device, x.dtype) == backend
        torch.testing.assert_close(layer(x).double(), x.double() @ qt.dequantize(torch.float64).T, rtol=1e-5, atol=1e-5)
