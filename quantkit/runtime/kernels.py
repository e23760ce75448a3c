"""Kernel selection for QuantLinear: which matmul serves a packed weight on a given device and dtype.

Backends:
- ``dequant``: decode the packed tensors to a dense weight on every call, then ``F.linear``. Always
  available; every other backend is tested against it.
- ``cpu``: quantkit's fused C kernels (``quantkit_kernels.cpu_int``), built for the best instruction set this
  CPU has (``quantkit_kernels.cpu_isa``: AVX-512 BF16/VNNI, AVX-512, AVX2 or portable C;
  ``$QUANTKIT_CPU_ISA`` picks another), for integer weights whose input size is a multiple of 32 and whose
  groups are 16 columns or a multiple of 32; 2- and 3-bit codes run as 4-bit ones; act-order by permuting
  columns. Decode (up to 16 rows) is exact in float32; prefill multiplies dequantized slabs in bfloat16
  where the CPU has native bf16 (``$QUANTKIT_CPU_PREFILL=fp32`` keeps it exact).
- ``cpu-int8``: as ``cpu``, but decode rounds the activations to int8 per block of 32 and multiplies with
  integer dot products (VNNI, or AVX2 maddubs); FP4 layers too, their E2M1 codes mapped to integers.
- ``aten``: torch's ``_weight_int4pack_mm_for_cpu`` (group sizes 32-256) or ``_weight_int8pack_mm``
  (per-channel 8-bit).
- ``triton``: the fused Triton GEMM on CUDA devices (on CPU too under ``TRITON_INTERPRET=1``, for tests).

``auto`` takes, on CUDA, triton then dequant; on CPU, cpu (exact), then aten for half-precision activations
(torch's float32 int4 path is slower than a dense matmul), then dequant. ``cpu-int8`` is asked for by name: its
int8 decode costs SmolLM2-135M under 0.5% WikiText-2 perplexity at W4 and W8
(scripts/bench_serving_accuracy.py) and decodes faster.

SpQR layers (:mod:`quantkit.runtime.spqr_kernels`) have ``cpu``/``cpu-int8`` paths (the dense part through
the same C kernels, its statistics decoded at load or, in the int8 decode on AVX-512, read as stored; plus a
CSR outlier correction, in C for decode batches) and a ``triton`` one
(the fused dense kernel plus the same correction). FP4 layers (:mod:`quantkit.runtime.fp4_kernels`) have
``cpu``/``cpu-int8`` paths (the C kernels when the input size is a multiple of 32, else rows decoded per call
through a byte table) and a ``triton`` one (``quantkit_kernels.triton_fp4``).
"""

from __future__ import annotations

import ctypes
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

from quantkit.errors import QuantkitError
from quantkit.formats.base import QuantizedTensor
from quantkit.formats.floatgrid import FloatQuantizedTensor
from quantkit.formats.intgrid import IntQuantizedTensor
from quantkit.formats.spqr import SpQRQuantizedTensor

BACKENDS = ("auto", "dequant", "cpu", "cpu-int8", "aten", "triton")
CPU_BACKENDS = {"cpu": "float", "cpu-int8": "int8"}  # backend -> activations of the decode GEMV
Kernel = Callable[[torch.Tensor], torch.Tensor]


def check_backend(name: str) -> str:
    """``name`` if it is a known backend, else a clear error."""
    if name not in BACKENDS:
        raise QuantkitError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def default_backend() -> str:
    """``$QUANTKIT_KERNEL`` when set, else ``auto``."""
    return check_backend(os.environ.get("QUANTKIT_KERNEL", "auto"))


def contiguous_groups(qt: IntQuantizedTensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Codes with columns sorted so that every group is one contiguous run of ``group_size`` columns.

    Returns ``(codes, columns)`` where ``columns[i]`` is the input column at position ``i`` (``None`` when
    already in order), or ``None`` when the grouping cannot be laid out that way.
    """
    out_features, in_features = qt.shape
    size = qt.scheme.group_columns(in_features)
    natural = torch.arange(in_features) // size
    if qt.g_idx is None or torch.equal(qt.g_idx.long(), natural):
        return qt.codes, None
    columns = torch.argsort(qt.g_idx.long(), stable=True)
    if not torch.equal(qt.g_idx.long()[columns], natural):
        return None
    return qt.codes[:, columns].contiguous(), columns


def _from_environment(choose: Callable[[], object]):
    """``choose()`` (a choice read from ``$QUANTKIT_CPU_ISA``/``$QUANTKIT_CPU_PREFILL``), its ValueError as a
    one-line QuantkitError."""
    try:
        return choose()
    except ValueError as exc:
        raise QuantkitError(str(exc)) from None


def describe_machine() -> dict:
    """This CPU, its flags and the kernel build and prefill dtype chosen for it (``quantkit env``)."""
    from quantkit_kernels.cpu_isa import describe

    return _from_environment(describe)


@dataclass(frozen=True)
class CpuBuild:
    """The C kernel library for this CPU: its instruction set and the prefill GEMM dtype."""

    library: ctypes.CDLL
    isa: str
    prefill: torch.dtype


def cpu_build() -> CpuBuild | None:
    """The C kernels for the instruction set chosen for this CPU (see ``quantkit_kernels.cpu_isa``), or None
    (with a warning) where they cannot be built."""
    from quantkit_kernels.cpu_isa import chosen_isa, prefill_dtype

    isa, prefill = _from_environment(lambda: (chosen_isa(), prefill_dtype()))
    library = _cpu_library(isa)
    return None if library is None else CpuBuild(library, isa.name, prefill)


@cache
def _cpu_library(isa) -> ctypes.CDLL | None:
    from quantkit.models.gguf_cache import cache_root
    from quantkit_kernels.cpu_build import KernelBuildError, load_library

    try:
        return load_library(cache_root() / "kernels", isa)
    except KernelBuildError as exc:
        warnings.warn(f"quantkit CPU kernels unavailable ({exc}); using slower paths", stacklevel=3)
        return None


def _cpu_kernel(qt: IntQuantizedTensor, stored: dict[str, torch.Tensor], activations: str) -> Kernel | None:
    from quantkit_kernels.cpu_int import BLOCK, CpuIntKernel

    in_features = qt.shape[1]
    size = qt.scheme.group_columns(in_features)
    if in_features % BLOCK or not (size == 16 or size % BLOCK == 0):
        return None
    build = cpu_build()
    layout = contiguous_groups(qt)
    if build is None or layout is None:
        return None
    codes, columns = layout
    bits = 8 if qt.scheme.bits == 8 else 4
    native = qt.scheme.bits == 4 and columns is None and size != 16
    return CpuIntKernel.from_codes(
        build.library, build.isa, build.prefill, codes, qt.scales, qt.zeros.to(torch.uint8), size, bits, columns,
        activations, native_packed=stored["qweight"].view(torch.uint8) if native else None,
    )


def _aten_kernel(qt: IntQuantizedTensor, dtype: torch.dtype) -> Kernel | None:
    from quantkit_kernels.aten_int import AtenInt4Kernel, AtenInt8Kernel, int4_fits

    if qt.scheme.bits == 8:
        return AtenInt8Kernel.from_codes(qt.codes, qt.scales, qt.zeros, dtype) if qt.scheme.group_size == -1 else None
    size = qt.scheme.group_size
    layout = contiguous_groups(qt)
    if layout is None or not int4_fits(*qt.shape, size):
        return None
    codes, columns = layout
    return AtenInt4Kernel.from_codes(codes, qt.scales, qt.zeros, size, dtype, columns)


def _triton_kernel(qt: IntQuantizedTensor, stored: dict[str, torch.Tensor], device: torch.device) -> Kernel | None:
    from quantkit_kernels import triton_int

    if not triton_int.is_supported(qt.scheme.bits, device):  # CUDA, or any device under TRITON_INTERPRET=1
        return None
    g_idx = None if qt.g_idx is None else qt.g_idx.to(device=stored["qweight"].device, dtype=torch.int32)
    qweight, scales, qzeros = stored["qweight"], stored["scales"], stored["qzeros"]
    bits, size = qt.scheme.bits, qt.scheme.group_size

    def run(x: torch.Tensor) -> torch.Tensor:
        return triton_int.int_matmul(x, qweight, scales, qzeros, g_idx, bits, size)

    return run


def _int_kernel(name: str, qt: IntQuantizedTensor, stored: dict[str, torch.Tensor], device: torch.device,
                dtype: torch.dtype) -> Kernel | None:
    on_cuda = device.type == "cuda"
    if name == "triton":
        return _triton_kernel(qt, stored, device)
    if name in CPU_BACKENDS and not on_cuda:
        return _cpu_kernel(qt, stored, CPU_BACKENDS[name])
    if name == "aten" and not on_cuda:
        return _aten_kernel(qt, dtype)
    return None


def _spqr_kernel(name: str, qt: SpQRQuantizedTensor, device: torch.device) -> Kernel | None:
    from quantkit.runtime.spqr_kernels import SpQRCpuKernel, SpQRTritonKernel

    if name in CPU_BACKENDS and device.type == "cpu":
        return SpQRCpuKernel(qt, cpu_build(), CPU_BACKENDS[name])
    if name == "triton":
        from quantkit_kernels import triton_spqr

        return SpQRTritonKernel(qt, device) if triton_spqr.is_supported(SpQRTritonKernel.kernel_bits(qt.scheme.bits), device) else None
    return None


def _float_kernel(name: str, qt: FloatQuantizedTensor, stored: dict[str, torch.Tensor], device: torch.device) -> Kernel | None:
    from quantkit.runtime.fp4_kernels import FloatSlabKernel, FloatTritonKernel, c_kernel

    if name in CPU_BACKENDS and device.type == "cpu":
        return c_kernel(cpu_build(), qt, stored, CPU_BACKENDS[name]) or FloatSlabKernel(qt, stored)
    if name == "triton":
        from quantkit_kernels import triton_fp4

        return FloatTritonKernel(qt, stored, device) if triton_fp4.is_supported(device) else None
    return None


def dequant_kernel(decode: Callable[[], QuantizedTensor]) -> Kernel:
    """The reference path: decode the stored tensors and dequantize on every call."""
    return lambda x: F.linear(x, decode().dequantize(x.dtype))


def build_kernel(
    decode: Callable[[], QuantizedTensor], stored: dict[str, torch.Tensor], device: torch.device,
    dtype: torch.dtype, backend: str, decoded: QuantizedTensor | None = None,
) -> tuple[str, Kernel]:
    """``(backend name, kernel)`` for a layer (``decoded``: its weight already decoded from ``stored``, when the
    caller has it); an explicitly named backend that cannot serve it is an error."""
    if backend == "dequant":
        return "dequant", dequant_kernel(decode)
    qt = decoded if decoded is not None else decode()
    on_cuda = device.type == "cuda"
    if backend == "auto":
        order = ["triton"] if on_cuda else ["cpu"] + (["aten"] if dtype in (torch.float16, torch.bfloat16) else [])
    else:
        order = [backend]
    for name in order:
        if isinstance(qt, IntQuantizedTensor):
            kernel = _int_kernel(name, qt, stored, device, dtype)
        elif isinstance(qt, SpQRQuantizedTensor):
            kernel = _spqr_kernel(name, qt, device)
        elif isinstance(qt, FloatQuantizedTensor):
            kernel = _float_kernel(name, qt, stored, device)
        else:
            kernel = None
        if kernel is not None:
            return name, kernel
    if backend != "auto":
        raise QuantkitError(f"kernel backend {backend!r} cannot serve a {qt.meta()['kind']} layer "
                            f"{list(qt.shape)} on {device.type} ({qt.meta()})")
    return "dequant", dequant_kernel(decode)
