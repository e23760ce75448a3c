"""CPU serving kernels against a float64 dequantize-then-matmul reference, and QuantLinear's dispatch."""

from __future__ import annotations

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.packing import pack_rows
from quantkit.runtime.kernels import build_kernel, contiguous_groups
from quantkit.runtime.quant_linear import QuantLinear
from quantkit.schemes import QuantScheme
from quantkit_kernels.cpu_isa import BY_NAME, ISA_ENV, ISAS, PREFILL_ENV, supported

TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def random_weight(out_features: int, in_features: int, scheme: QuantScheme, act_order: bool, seed: int) -> IntQuantizedTensor:
    """Random codes and statistics; act-order groups as GPTQ makes them (a permutation cut into groups)."""
    gen = torch.Generator().manual_seed(seed)
    size = in_features if scheme.group_size == -1 else scheme.group_size
    groups = -(-in_features // size)
    codes = torch.randint(0, 2**scheme.bits, (out_features, in_features), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3).half()
    if scheme.symmetric:
        zeros = torch.full((out_features, groups), 2 ** (scheme.bits - 1), dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 2**scheme.bits, (out_features, groups), generator=gen, dtype=torch.uint8)
    g_idx = None
    if act_order:
        g_idx = torch.empty(in_features, dtype=torch.int32)
        g_idx[torch.randperm(in_features, generator=gen)] = (torch.arange(in_features) // size).to(torch.int32)
    return IntQuantizedTensor(codes, scales, zeros, scheme, g_idx)


def reference_weight(qt: IntQuantizedTensor) -> torch.Tensor:
    """float64 weight straight from the codes: ``scale[g(j)] * (code - zero[g(j)])`` column by column."""
    size = qt.shape[1] if qt.scheme.group_size == -1 else qt.scheme.group_size
    groups = qt.g_idx.long() if qt.g_idx is not None else torch.arange(qt.shape[1]) // size
    return qt.scales.double()[:, groups] * (qt.codes.double() - qt.zeros.double()[:, groups])


def quant_linear(qt: IntQuantizedTensor, backend: str) -> QuantLinear:
    out_features, in_features = qt.shape
    layer = QuantLinear(in_features, out_features, False, qt.meta(), torch.float32, backend=backend)
    for name, tensor in qt.to_tensors().items():
        setattr(layer, name, tensor)
    return layer


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> None:
    reference = x.double() @ w.t()
    assert y.dtype == dtype and y.shape == reference.shape
    error = (y.double() - reference).norm() / reference.norm()
    assert error < TOLERANCE[dtype], f"relative error {error:.2e}"
    # Every element, not just the norm: an unwritten output element would stand out here.
    scale = reference.abs().max()
    assert torch.allclose(y.double(), reference, rtol=0, atol=float(scale) * TOLERANCE[dtype] * 8)


SCHEMES = [
    QuantScheme(4, 32, True), QuantScheme(4, 64, False), QuantScheme(4, 128, True), QuantScheme(4, -1, False),
    QuantScheme(8, 64, True), QuantScheme(8, -1, False), QuantScheme(3, 64, False), QuantScheme(2, 32, True),
    QuantScheme(4, 16, False), QuantScheme(8, 16, True), QuantScheme(4, 96, False),
]
SCHEME_ID = lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}"  # noqa: E731


@pytest.fixture(params=[isa.name for isa in ISAS])
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel build this CPU can run (the portable one always), chosen through $QUANTKIT_CPU_ISA, with
    float32 prefill."""
    if BY_NAME[request.param] not in supported():
        pytest.skip(f"this CPU cannot run the {request.param} build")
    monkeypatch.setenv(ISA_ENV, request.param)
    monkeypatch.setenv(PREFILL_ENV, "fp32")
    return request.param


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_ID)
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "actorder"])
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 70])
def test_cpu_kernel_matches_float64_reference(isa: str, scheme: QuantScheme, act_order: bool, rows: int) -> None:
    in_features = 416 if rows % 2 else 384  # an odd and an even number of 32-column blocks
    qt = random_weight(72, in_features, scheme, act_order, seed=rows)
    layer = quant_linear(qt, "cpu")
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows + 1))
    assert layer.kernel_name(x.device, x.dtype) == "cpu"
    assert f"isa={isa}," in repr(layer._kernel(x.device, x.dtype)[1])
    assert_matches_reference(layer(x), x, reference_weight(qt), torch.float32)


def int8_blocks(x: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
    """``x`` as the int8 decode path sees it: in the kernel's position order, each block of 32 rounded to
    ``d * round(x * (127 / amax))`` with ``d = amax / 127`` (float32 arithmetic), back in column order, float64."""
    positions = x[:, columns] if columns is not None else x
    blocks = positions.reshape(x.shape[0], -1, 32)
    amax = blocks.abs().amax(dim=2, keepdim=True)
    inverse = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    rounded = (torch.round(blocks * inverse).double() * (amax / 127).double()).reshape(x.shape[0], -1)
    out = torch.empty_like(rounded)
    out[:, columns if columns is not None else slice(None)] = rounded
    return out


@pytest.mark.parametrize("scheme", SCHEMES, ids=SCHEME_ID)
@pytest.mark.parametrize("act_order", [False, True], ids=["seq", "actorder"])
@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("in_features", [384, 416])  # an even and an odd number of 32-column blocks
def test_int8_activation_decode_matches_its_float64_reference(isa: str, scheme: QuantScheme, act_order: bool,
                                                               rows: int, in_features: int) -> None:
    """The integer dot products compute exactly the product of the block-rounded activations."""
    qt = random_weight(40, in_features, scheme, act_order, seed=rows)
    layer = quant_linear(qt, "cpu-int8")
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows + 2))
    x[0, :32] = 0.0  # an all-zero block: scale 0, no division by zero
    kernel = layer._kernel(x.device, x.dtype)[1]
    assert "decode=int8" in repr(kernel) and f"isa={isa}," in repr(kernel)
    assert_matches_reference(layer(x), int8_blocks(x, kernel.gemv_columns), reference_weight(qt), torch.float32)


def test_bf16_prefill_rounds_the_dequantized_slab_to_nearest_even(isa: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill in bfloat16: the C kernels write the slab as torch rounds float32 to bfloat16, and the product
    stays within bfloat16's precision of the float64 reference."""
    monkeypatch.setenv(PREFILL_ENV, "bf16")
    for scheme in (QuantScheme(4, 64, False), QuantScheme(8, -1, True), QuantScheme(4, 16, True)):
        qt = random_weight(48, 256, scheme, act_order=True, seed=4)
        kernel = quant_linear(qt, "cpu")._kernel(torch.device("cpu"), torch.float32)[1]
        assert "prefill=bfloat16" in repr(kernel)
        exact = torch.empty(48, 256)
        rounded = torch.empty(48, 256, dtype=torch.bfloat16)
        assert kernel.run_dequant(0, 48, exact) == 0 and kernel.run_dequant(0, 48, rounded) == 0
        assert torch.equal(rounded, exact.to(torch.bfloat16))
        x = torch.randn(40, 256, generator=torch.Generator().manual_seed(1))
        assert_matches_reference(kernel(x).to(torch.bfloat16), x, reference_weight(qt), torch.bfloat16)


def test_isa_choice_is_the_best_this_cpu_has_and_can_be_overridden(monkeypatch: pytest.MonkeyPatch) -> None:
    from quantkit_kernels.cpu_isa import chosen_isa

    monkeypatch.delenv(ISA_ENV, raising=False)
    assert chosen_isa() == supported()[-1]
    monkeypatch.setenv(ISA_ENV, "portable")
    assert chosen_isa().name == "portable"
    monkeypatch.setenv(ISA_ENV, "sse9")
    with pytest.raises(ValueError, match="not a kernel build"):
        chosen_isa()
    layer = quant_linear(random_weight(16, 64, QuantScheme(4, 32, True), False, 0), "cpu")
    with pytest.raises(QuantkitError, match="QUANTKIT_CPU_ISA"):
        layer(torch.randn(1, 64))
    missing = [isa for isa in ISAS if isa not in supported()]
    if missing:
        monkeypatch.setenv(ISA_ENV, missing[0].name)
        with pytest.raises(ValueError, match="this CPU lacks"):
            chosen_isa()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cpu", "aten", "dequant"])
def test_half_precision_activations(backend: str, dtype: torch.dtype) -> None:
    qt = random_weight(48, 192, QuantScheme(4, 64, False), act_order=True, seed=5)
    layer = quant_linear(qt, backend)
    x = torch.randn(2, 5, 192).to(dtype)
    y = layer(x)
    assert y.shape == (2, 5, 48)
    assert_matches_reference(y.reshape(10, 48), x.reshape(10, 192), reference_weight(qt), dtype)


@pytest.mark.parametrize("scheme", [QuantScheme(4, 32, True), QuantScheme(4, 128, False), QuantScheme(3, 64, True),
                                    QuantScheme(8, -1, True), QuantScheme(8, -1, False)],
                         ids=lambda s: f"w{s.bits}g{s.group_size}{'s' if s.symmetric else 'a'}")
@pytest.mark.parametrize("rows", [1, 9])
def test_aten_kernels_match_float64_reference(scheme: QuantScheme, rows: int) -> None:
    qt = random_weight(64, 256, scheme, act_order=scheme.bits != 8, seed=rows)
    layer = quant_linear(qt, "aten")
    x = torch.randn(rows, 256)
    assert layer.kernel_name(x.device, x.dtype) == "aten"
    assert_matches_reference(layer(x), x, reference_weight(qt), torch.float32)


def test_every_backend_agrees_with_dequant_on_three_dimensional_input() -> None:
    qt = random_weight(48, 128, QuantScheme(4, 32, True), act_order=True, seed=3)
    x = torch.randn(3, 7, 128)
    outputs = {b: quant_linear(qt, b)(x) for b in ("dequant", "cpu", "aten", "auto")}
    for backend, y in outputs.items():
        torch.testing.assert_close(y, outputs["dequant"], rtol=1e-5, atol=1e-5, msg=backend)


def test_auto_falls_back_to_dequant_where_no_kernel_fits() -> None:
    qt = random_weight(16, 48, QuantScheme(4, 16, True), act_order=False, seed=0)  # 48 columns: not a multiple of 32
    layer = quant_linear(qt, "auto")
    x = torch.randn(2, 48)
    assert layer.kernel_name(x.device, x.dtype) == "dequant"
    assert_matches_reference(layer(x), x, reference_weight(qt), torch.float32)


def test_a_named_backend_that_cannot_serve_the_layer_is_an_error() -> None:
    layer = quant_linear(random_weight(16, 48, QuantScheme(4, 16, True), False, 0), "cpu")
    with pytest.raises(QuantkitError, match="cannot serve"):
        layer(torch.randn(1, 48))
    with pytest.raises(QuantkitError, match="unknown kernel backend"):
        layer.set_backend("fast")


def test_irregular_act_order_groups_are_not_laid_out_contiguously() -> None:
    qt = random_weight(8, 64, QuantScheme(4, 32, True), act_order=False, seed=0)
    qt.g_idx = torch.tensor([0, 1] * 32, dtype=torch.int32)
    assert contiguous_groups(qt) is not None  # two groups of 32, interleaved: sortable
    qt.g_idx = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    assert contiguous_groups(qt) is None  # groups of 40 and 24 do not match group_size 32


def test_cpu_kernel_reads_the_native_packing_without_copying() -> None:
    qt = random_weight(32, 128, QuantScheme(4, 64, True), act_order=False, seed=1)
    stored = {"qweight": pack_rows(qt.codes, 4), "scales": qt.scales, "qzeros": pack_rows(qt.zeros, 4)}
    _, kernel = build_kernel(lambda: qt, stored, torch.device("cpu"), torch.float32, "cpu")
    assert kernel.codes.data_ptr() == stored["qweight"].data_ptr()


# ---------------------------------------------------------------- FP4 (E2M1) weights

FP4_CASES = [("nvfp4", 16), ("mxfp4", 32), ("fp4", 64), ("fp4", 24)]  # fp4 g24: blocks the C kernels do not take


def random_fp4_weight(out_features: int, in_features: int, fmt: str, block: int, seed: int):
    """Random E2M1 codes (all 16) and stored scales of every byte the format allows."""
    from quantkit.formats.floatgrid import FloatQuantizedTensor

    gen = torch.Generator().manual_seed(seed)
    groups = -(-in_features // block)
    codes = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.uint8)
    global_scale = None
    if fmt == "mxfp4":
        scales = torch.randint(118, 130, (out_features, groups), generator=gen, dtype=torch.uint8)
    elif fmt == "nvfp4":
        scales = (torch.rand(out_features, groups, generator=gen) * 400 + 0.01).to(torch.float8_e4m3fn)
        global_scale = torch.tensor([2688.0 / 0.3])
    else:
        scales = (torch.rand(out_features, groups, generator=gen) * 0.02 + 1e-3).half()
    return FloatQuantizedTensor(codes, scales, QuantScheme(4, block, True, fmt), global_scale)


def fp4_reference(qt) -> torch.Tensor:
    """float64 weight from the codes, column by column (E2M1 table, decoded scales, global divisor)."""
    magnitudes = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=torch.float64)
    values = magnitudes[(qt.codes & 7).long()] * (1 - 2 * (qt.codes >> 3).double())
    if qt.scheme.format == "mxfp4":
        scales = torch.pow(2.0, qt.scales.double() - 127)
    else:
        scales = qt.scales.float().double()
    if qt.global_scale is not None:
        scales = (scales.float() / qt.global_scale).double()
    return values * scales[:, torch.arange(qt.shape[1]) // qt.scheme.group_size]


@pytest.mark.parametrize("fmt,block", FP4_CASES)
@pytest.mark.parametrize("m", [1, 3, 6, 40])  # GEMV tiles of 4 plus remainders, and the slab GEMM
def test_fp4_cpu_kernel_matches_the_reference(isa: str, fmt: str, block: int, m: int) -> None:
    qt = random_fp4_weight(72, 160, fmt, block, seed=m)  # fp4 g64: a partial last block
    layer = quant_linear(qt, "cpu")
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(9))
    kernel = layer._kernel(x.device, torch.float32)[1]
    uses_c = type(kernel).__name__ == "CpuFp4Kernel"
    assert uses_c == (block != 24)
    assert_matches_reference(layer(x), x, fp4_reference(qt), torch.float32)
    assert_matches_reference(layer(x.bfloat16()), x.bfloat16().float(), fp4_reference(qt), torch.bfloat16)


@pytest.mark.parametrize("fmt,block", FP4_CASES[:3])
@pytest.mark.parametrize("rows", [1, 4, 7, 16])
def test_fp4_int8_activation_decode_matches_its_float64_reference(isa: str, fmt: str, block: int, rows: int) -> None:
    """cpu-int8 FP4 decode (E2M1 as integer codes through a byte table, byte or half scales decoded in the
    kernel) computes the product of the block-rounded activations; 72 outputs: a partial last tile of rows."""
    qt = random_fp4_weight(72, 160, fmt, block, seed=rows)  # fp4 g64: a partial last block
    layer = quant_linear(qt, "cpu-int8")
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows + 3))
    x[0, :32] = 0.0
    kernel = layer._kernel(x.device, x.dtype)[1]
    tiled = "avx512" in isa
    assert f"decode=int8{'-tiled' if tiled else ''}," in repr(kernel) and f"isa={isa}," in repr(kernel)
    assert_matches_reference(layer(x), int8_blocks(x, kernel.gemv_columns), fp4_reference(qt), torch.float32)


def test_fp4_cpu_kernel_falls_back_when_the_input_is_not_a_multiple_of_32() -> None:
    qt = random_fp4_weight(24, 80, "nvfp4", 16, seed=1)
    layer = quant_linear(qt, "cpu")
    x = torch.randn(2, 80, generator=torch.Generator().manual_seed(2))
    assert type(layer._kernel(x.device, torch.float32)[1]).__name__ == "FloatSlabKernel"
    assert_matches_reference(layer(x), x, fp4_reference(qt), torch.float32)


# ---------------------------------------------------------------- SpQR

def random_spqr(out_features: int, in_features: int, scheme: QuantScheme, seed: int):
    """Random SpQR codes, 3-bit statistics over blocks of 16 rows, a permutation and ~2% outliers."""
    from quantkit.formats.spqr import CsrOutliers, SpQRQuantizedTensor, StatCodes

    gen = torch.Generator().manual_seed(seed)
    groups, blocks = scheme.num_groups(in_features), -(-out_features // 16)

    def stats(spread: float) -> StatCodes:
        return StatCodes(torch.randint(0, 8, (groups, out_features), generator=gen, dtype=torch.uint8),
                         (torch.rand(groups, blocks, generator=gen) * spread + 1e-4).half(),
                         (torch.rand(groups, blocks, generator=gen) * 7).half())

    mask = torch.rand(out_features, in_features, generator=gen) < 0.02
    outliers = CsrOutliers.from_mask(mask, torch.randn(out_features, in_features, generator=gen) * 0.1)
    return SpQRQuantizedTensor(torch.randint(0, 2**scheme.bits, (out_features, in_features), generator=gen, dtype=torch.uint8),
                               stats(1e-2), None if scheme.symmetric else stats(1.0), outliers, scheme, 3, 16,
                               torch.randperm(in_features, generator=gen))


@pytest.mark.parametrize("scheme", [QuantScheme(3, 16, False), QuantScheme(3, 16, True), QuantScheme(4, 64, False),
                                    QuantScheme(8, 32, False)], ids=SCHEME_ID)
@pytest.mark.parametrize("rows", [1, 6, 16])
def test_spqr_int8_decode_matches_its_float64_reference(isa: str, scheme: QuantScheme, rows: int) -> None:
    """cpu-int8 SpQR decode (on AVX-512 from compact statistics decoded in registers, the outliers' correction in
    C): the dense part times the block-rounded activations plus the correction times the exact ones."""
    from quantkit.runtime.kernels import cpu_build
    from quantkit.runtime.spqr_kernels import SpQRCpuKernel

    qt = random_spqr(72, 160, scheme, seed=rows)
    build = cpu_build()
    kernel = SpQRCpuKernel(qt, build, "int8")
    assert f"isa={isa}," in repr(kernel)
    assert ("SpQR statistics" in repr(kernel)) == bool(build.library.qk_tile_rows(4 if scheme.bits <= 4 else 8))
    x = torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows + 4))
    dense = qt.dense_permuted().double()[:, torch.argsort(qt.perm)]
    expected = int8_blocks(x, kernel.fused.gemv_columns) @ dense.T + x.double() @ (qt.dequantize(torch.float64) - dense).T
    identity = torch.eye(72, dtype=torch.float64)  # the reference is the expected product itself
    assert_matches_reference(kernel(x), expected, identity, torch.float32)
