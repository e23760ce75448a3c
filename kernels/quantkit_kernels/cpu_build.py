"""Build the C kernels once per machine and load them with ctypes.

The shared library is compiled on first use with the system C compiler into a cache folder keyed by the
source, the flags and the compiler, written under a temporary name and renamed when complete. OpenMP comes
from ``libgomp.so.1``, the runtime torch itself loads, so the kernels share torch's thread pool.
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

import torch

SOURCE = Path(__file__).with_name("csrc") / "cpu_qgemm.c"

_c_ptr, _c_i64, _c_int, _c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    # x, m, k, codes, scales, half_scales, zeros, n, group_size, bits, y, threads
    "qk_gemv": [_c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_int, _c_ptr, _c_i64, _c_i64, _c_int, _c_ptr, _c_int],
    # codes, scales, half_scales, zeros, k, group_size, bits, row_begin, row_end, out, threads
    "qk_dequant_rows": [_c_ptr, _c_ptr, _c_int, _c_ptr, _c_i64, _c_i64, _c_int, _c_i64, _c_i64, _c_ptr, _c_int],
    # x, m, k, packed, scales, lut, global_scale, n, scale_block, y, threads
    "qk_fp4_gemv": [_c_ptr, _c_i64, _c_i64, _c_ptr, _c_ptr, _c_ptr, _c_float, _c_i64, _c_i64, _c_ptr, _c_int],
    # packed, scales, lut, global_scale, k, scale_block, row_begin, row_end, out, threads
    "qk_fp4_dequant_rows": [_c_ptr, _c_ptr, _c_ptr, _c_float, _c_i64, _c_i64, _c_i64, _c_i64, _c_ptr, _c_int],
}


class KernelBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here."""


def compile_flags() -> list[str]:
    """Optimisation flags: AVX2/FMA code when this CPU has them, portable code otherwise."""
    flags = ["-O3", "-fPIC", "-shared", "-fopenmp", "-std=c11"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags


def _compiler() -> str:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise KernelBuildError("no C compiler found (set $CC)")
    return compiler


def _build(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp.so", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        run = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if run.returncode != 0:
            raise KernelBuildError(f"compiling {SOURCE.name} failed: {run.stderr.strip().splitlines()[-1:]}")
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


@cache
def load_library(cache_dir: Path) -> ctypes.CDLL:
    """The compiled kernel library, building it into ``cache_dir`` if this source/flag set is new."""
    compiler, flags = _compiler(), compile_flags()
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    target = Path(cache_dir) / f"cpu_qgemm-{key}.so"
    if not target.is_file():
        _build(compiler, flags, target)
    try:
        library = ctypes.CDLL(str(target))
    except OSError as exc:
        raise KernelBuildError(f"cannot load {target}: {exc}") from None
    for name, argtypes in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, ctypes.c_int
    return library
