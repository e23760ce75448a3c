"""The instruction sets the C kernels are built for, which of them this CPU has, and which one serves.

Each :class:`Isa` is one build of ``csrc/cpu_qgemm.c`` (the compiler's macros pick the code paths). The best
one the running CPU has is chosen, unless ``$QUANTKIT_CPU_ISA`` names another this CPU has (``portable``
always works). AMX has no build of its own: prefill GEMMs go through torch's oneDNN, which uses AMX tiles
where the CPU has them.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache

import torch

ISA_ENV = "QUANTKIT_CPU_ISA"
PREFILL_ENV = "QUANTKIT_CPU_PREFILL"
PREFILL_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class Isa:
    """One build: its compiler flags and the ``/proc/cpuinfo`` flags a CPU needs to run it."""

    name: str
    compile_flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]


_AVX2 = Isa("avx2", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c"))
_AVX512 = Isa("avx512", (*_AVX2.compile_flags, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"),
              (*_AVX2.cpu_flags, "avx512f", "avx512bw", "avx512vl", "avx512dq"))
_VNNI = Isa("avx512vnni", (*_AVX512.compile_flags, "-mavx512vnni"), (*_AVX512.cpu_flags, "avx512_vnni"))
_BF16 = Isa("avx512bf16", (*_VNNI.compile_flags, "-mavx512bf16"), (*_VNNI.cpu_flags, "avx512_bf16"))
ISAS = (Isa("portable", (), ()), _AVX2, _AVX512, _VNNI, _BF16)  # each needs what the one before needs
BY_NAME = {isa.name: isa for isa in ISAS}

_CAPABILITY_FLAGS = {"AVX2": _AVX2.cpu_flags, "AVX512": _AVX512.cpu_flags}  # where /proc/cpuinfo is missing


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; elsewhere what torch's own dispatch detected)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset(_CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ()))


@cache
def cpu_model() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def supported() -> list[Isa]:
    """The builds this CPU can run, best last."""
    flags = cpu_flags()
    return [isa for isa in ISAS if set(isa.cpu_flags) <= flags]


def chosen_isa() -> Isa:
    """``$QUANTKIT_CPU_ISA`` when set (it must be a build this CPU runs), else the best this CPU has."""
    name = os.environ.get(ISA_ENV)
    if not name:
        return supported()[-1]
    if name not in BY_NAME:
        raise ValueError(f"${ISA_ENV}={name!r} is not a kernel build; choose one of {', '.join(BY_NAME)}")
    if BY_NAME[name] not in supported():
        missing = sorted(set(BY_NAME[name].cpu_flags) - cpu_flags())
        raise ValueError(f"${ISA_ENV}={name!r}: this CPU lacks {', '.join(missing)}")
    return BY_NAME[name]


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), so bf16 GEMMs beat float32 ones."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def prefill_dtype() -> torch.dtype:
    """The GEMM dtype of prefill slabs: ``$QUANTKIT_CPU_PREFILL`` (bf16 or fp32) when set, else bfloat16 where
    the CPU has native bf16 and float32 elsewhere."""
    name = os.environ.get(PREFILL_ENV)
    if not name:
        return torch.bfloat16 if native_bf16() else torch.float32
    if name not in PREFILL_DTYPES:
        raise ValueError(f"${PREFILL_ENV}={name!r}: choose one of {', '.join(PREFILL_DTYPES)}")
    return PREFILL_DTYPES[name]


FLAGS_OF_INTEREST = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                     "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def describe() -> dict:
    """This CPU and the kernel choice made for it (what ``quantkit env`` and the benchmarks print); a
    ValueError when ``$QUANTKIT_CPU_ISA`` or ``$QUANTKIT_CPU_PREFILL`` asks for what cannot be."""
    isa, prefill = chosen_isa().name, str(prefill_dtype()).removeprefix("torch.")
    flags = cpu_flags()
    return {"model": cpu_model(), "cores": os.cpu_count(), "flags": [f for f in FLAGS_OF_INTEREST if f in flags],
            "builds": [b.name for b in supported()], "isa": isa, "prefill": prefill}
