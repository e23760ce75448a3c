"""Build the C kernels once per machine and instruction set, and load them with ctypes.

Each build of ``csrc/cpu_qgemm.c`` (the GEMV and dequantization kernels) and ``csrc/cpu_decode.c`` (the lean
decoder's steps outside the linears), one per :class:`quantkit_kernels.cpu_isa.Isa`, is compiled on first use
with the system C compiler into a cache folder keyed by the sources, the flags and the compiler, written
under a temporary name and renamed when complete. OpenMP comes from ``libgomp.so.1``, the runtime torch
itself loads, so the kernels share torch's thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

from quantkit_kernels.cpu_isa import Isa

SOURCES = tuple(Path(__file__).with_name("csrc") / name for name in ("cpu_qgemm.c", "cpu_decode.c"))
BASE_FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11")

_c_ptr, _c_i64, _c_int, _c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


SCALE_FORMATS = {"e8m0": 1, "e4m3": 2, "spqr": 3}  # the C ``scale_format`` of statistics other than float


class QkWeight(ctypes.Structure):
    """The C ``qk_weight``: an integer weight matrix as the kernels read it. The fields after ``float_zeros``
    (scale format, code table, constant zero point, scale divisor, SpQR's smallest scale) default to unused."""

    _fields_ = [("codes", _c_ptr), ("scales", _c_ptr), ("zeros", _c_ptr), ("n", _c_i64), ("k", _c_i64),
                ("group_size", _c_i64), ("bits", ctypes.c_int32), ("half_scales", ctypes.c_int32),
                ("float_zeros", ctypes.c_int32), ("scale_format", ctypes.c_int32), ("code_table", _c_ptr),
                ("zero_point", _c_float), ("scale_divisor", _c_float), ("min_scale", _c_float)]


_WEIGHT = ctypes.POINTER(QkWeight)
_SIGNATURES = {
    # weight, x, m, y, threads
    "qk_gemv": [_WEIGHT, _c_ptr, _c_i64, _c_ptr, _c_int],
    "qk_gemv_q8": [_WEIGHT, _c_ptr, _c_i64, _c_ptr, _c_int],
    "qk_gemv_q8_tiled": [_WEIGHT, _c_ptr, _c_i64, _c_ptr, _c_int],
    "qk_tile_rows": [_c_int],
    # offsets, columns, deltas, n, x, m, k, y, threads
    "qk_csr_add": [_c_ptr, _c_ptr, _c_ptr, _c_i64, _c_ptr, _c_i64, _c_i64, _c_ptr, _c_int],
    # weight, row_begin, row_end, out, bf16, threads
    "qk_dequant_rows": [_WEIGHT, _c_i64, _c_i64, _c_ptr, _c_int, _c_int],
    # x, m, k, packed, scales, lut, global_scale, n, scale_block, y, threads
    "qk_fp4_gemv": [_c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_float, _c_i64, _c_i64, _c_ptr, _c_int],
    # packed, scales, lut, global_scale, k, scale_block, row_begin, row_end, out, bf16, threads
    "qk_fp4_dequant_rows": [_c_ptr, _c_ptr, _c_ptr, _c_float, _c_i64, _c_i64, _c_i64, _c_i64, _c_ptr, _c_int, _c_int],
    # x, w, rows, n, eps, out
    "qk_rms_norm": [_c_ptr, _c_ptr, _c_i64, _c_i64, _c_float, _c_ptr],
    # qkv, heads, kv_heads, head_dim, q_norm, k_norm, eps, cos, sin, keys, values, max_len, pos, scale, out
    "qk_attend_decode": [_c_ptr, _c_i64, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_float, _c_ptr, _c_ptr, _c_ptr, _c_ptr,
                         _c_i64, _c_i64, _c_float, _c_ptr],
}


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here."""


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("no C compiler found (set $CC)")
    return compiler


def _build(command: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        run = subprocess.run([*command, "-o", str(tmp), "-lm"], capture_output=True, text=True)
        if run.returncode != 0:
            raise KernelBuildError(f"compiling {target.stem} failed: {run.stderr.strip().splitlines()[-1:]}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


@cache
def load_library(cache_dir: Path, isa: Isa) -> ctypes.CDLL:
    """The kernel library built for ``isa``, compiling it into ``cache_dir`` if this source/flag set is new."""
    command = [_compiler(), *BASE_FLAGS, *isa.compile_flags, *map(str, SOURCES)]
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES) + " ".join(command).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"cpu_qgemm-{isa.name}-{key}.so"
    if not target.is_file():
        _build(command, target)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelBuildError(f"cannot load {target}: {exc}") from None
    library.qk_isa.restype = ctypes.c_char_p
    built = library.qk_isa().decode()
    if built != isa.name:
        raise KernelBuildError(f"{target.name} was compiled for {built}, not {isa.name} (compiler flags ignored?)")
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library
