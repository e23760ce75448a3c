"""quantkit's compute kernels: fused dequantize-GEMM for packed integer weights.

``cpu`` holds the CPU path (a small C library built on first use, plus torch's own int4/int8 kernels);
``triton_int`` holds the GPU path written in Triton (tested on CPU with ``TRITON_INTERPRET=1``).
Both read quantkit's native packed layout directly.
"""
