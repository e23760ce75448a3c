"""quantkit's compute kernels: fused dequantize-GEMM for packed quantized weights.

``cpu_int``/``aten_int`` hold the CPU path for integer weights (a small C library built on first use, plus
torch's own int4/int8 kernels). The GPU path is written in Triton (tested on CPU with ``TRITON_INTERPRET=1``):
``triton_int`` (integer grids), ``triton_spqr`` (SpQR's dense part) and ``triton_fp4`` (E2M1 with E8M0, E4M3
or float16 block scales). All read quantkit's native packed layouts directly.
"""
