"""Fused dequantize + matmul in Triton for FP4 (E2M1) weights with block scales (MXFP4 / NVFP4).

A linear layer with weight ``W [N, K]`` is stored as compressed-tensors' ``*fp4-pack-quantized`` layout:
``packed`` uint8 ``[N, ceil(K/2)]`` holds code ``k`` of row ``n`` in byte ``k // 2``, in the low nibble for
even ``k`` and the high nibble for odd ``k``. A code's bit 3 is the sign and bits 0-2 index the E2M1
magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``. ``scales [N, ceil(K/block_size)]`` hold one scale per block of
columns, in one of three formats:

- ``"e8m0"`` (MXFP4): uint8 ``b`` meaning ``2**(b - 127)``;
- ``"e4m3"`` (NVFP4): the bytes of ``torch.float8_e4m3fn`` scales, viewed as uint8;
- ``"fp16"``: float16/bfloat16/float32 scales used as they are.

With an optional float32 ``global_scale [1]`` (NVFP4) the block scale is ``scale / global_scale``. In float32,
``W[n, k] = e2m1(code[n, k]) * block_scale[n, k // block_size]``. The kernel decodes weight tiles in
registers and accumulates ``x @ W.T`` in float32; the dot and the split-K launch are shared with
:mod:`quantkit_kernels.triton_int`.
"""

from __future__ import annotations

import torch

from quantkit_kernels.triton_int import INTERPRETED, TRITON_AVAILABLE, check_inputs, launch_gemm
from quantkit_kernels.triton_int import is_supported as _int_supported

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from quantkit_kernels.triton_int import dot_x, store_tile, tile_coordinates

__all__ = ["INTERPRETED", "SCALE_FORMATS", "TRITON_AVAILABLE", "fp4_matmul", "is_supported"]

# The scale dtypes each scale format accepts.
SCALE_FORMATS = {
    "e8m0": (torch.uint8,),
    "e4m3": (torch.uint8,),
    "fp16": (torch.float16, torch.bfloat16, torch.float32),
}


def is_supported(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernel can run (on ``device``, when given)."""
    return _int_supported(4, device)


if TRITON_AVAILABLE:

    @triton.jit
    def _minifloat(bits, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr):
        """float32 value of int32 ``bits`` holding sign, exponent and mantissa (subnormals; no inf/NaN)."""
        e = (bits >> MAN_BITS) & ((1 << EXP_BITS) - 1)
        m = bits & ((1 << MAN_BITS) - 1)
        # Normal: (1.m) * 2**(e - BIAS); subnormal (e == 0): (0.m) * 2**(1 - BIAS). Both are integer
        # significands times 2**(1 - BIAS - MAN_BITS), which is exact in float32.
        significand = tl.where(e == 0, m, m + (1 << MAN_BITS)) << (tl.maximum(e, 1) - 1)
        magnitude = significand.to(tl.float32) * (2.0 ** (1 - BIAS - MAN_BITS))
        return tl.where(((bits >> (EXP_BITS + MAN_BITS)) & 1) != 0, -magnitude, magnitude)

    @triton.jit
    def _decode_scales(raw, SCALE_FORMAT: tl.constexpr):
        """Block scales in float32 from their stored form (uint8 bytes, or floats for ``"fp16"``)."""
        if SCALE_FORMAT == "e8m0":
            # 2**(b - 127) built from its float32 bits; b = 0 is the subnormal 2**-127.
            b = raw.to(tl.int32)
            scales = tl.where(b == 0, 1 << 22, b << 23).to(tl.float32, bitcast=True)
        elif SCALE_FORMAT == "e4m3":
            scales = _minifloat(raw.to(tl.int32), 4, 3, 7)
        else:
            scales = raw.to(tl.float32)
        return scales

    @triton.jit
    def _fp4_dequant_tile(
        p_ptr, s_ptr, gs_ptr,
        offs_k, offs_n, mask_k, mask_n,
        stride_pn, stride_pk, stride_sn, stride_sg,
        block_size,
        SCALE_FORMAT: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr,
    ):  # fmt: skip
        """Dequantized weight tile ``W.T[offs_k, offs_n]`` in float32; masked entries are 0."""
        mask = mask_k[:, None] & mask_n[None, :]
        rows = offs_n[None, :]
        cols = offs_k[:, None]
        packed = tl.load(p_ptr + rows * stride_pn + (cols // 2) * stride_pk, mask=mask, other=0)
        codes = (packed.to(tl.int32) >> ((cols % 2) * 4)) & 15
        raw = tl.load(s_ptr + rows * stride_sn + (cols // block_size) * stride_sg, mask=mask, other=0)
        scales = _decode_scales(raw, SCALE_FORMAT)
        if HAS_GLOBAL_SCALE:
            scales = tl.div_rn(scales, tl.load(gs_ptr))
        return _minifloat(codes, 2, 1, 1) * scales

    @triton.jit
    def _fp4_gemm_kernel(
        x_ptr, p_ptr, s_ptr, gs_ptr, b_ptr, y_ptr,
        M, N, K, block_size,
        stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg,
        stride_ym, stride_yn,
        SCALE_FORMAT: tl.constexpr, HAS_GLOBAL_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        """One ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T (+ bias)``, K split as in ``triton_int``."""
        offs_m, offs_n, mask_m, mask_n, pid_k = tile_coordinates(M, N, BLOCK_M, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = _fp4_dequant_tile(
                p_ptr, s_ptr, gs_ptr, offs_k, offs_n, mask_k, mask_n,
                stride_pn, stride_pk, stride_sn, stride_sg, block_size, SCALE_FORMAT, HAS_GLOBAL_SCALE,
            )  # fmt: skip
            acc += dot_x(
                x_ptr, w, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, DOT_PRECISION, DOT_IN_FP32
            )
        store_tile(y_ptr, acc, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K)


def fp4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: torch.Tensor | None,
    block_size: int,
    scale_format: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for packed FP4 weights; ``x [..., K]`` gives ``[..., N]`` in ``x.dtype``.

    ``scale_format`` is one of :data:`SCALE_FORMATS`; ``global_scale`` is None or a one-element float32
    tensor. Rows of ``x`` up to ``triton_int.SMALL_M`` split K.
    """
    check_inputs("fp4_matmul", x, 4)  # FP4 codes are 4-bit codes as far as the shared checks go
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"unknown scale_format {scale_format!r}; expected one of {sorted(SCALE_FORMATS)}")
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, got {block_size}")
    K = x.shape[-1]
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-K // 2):
        raise ValueError(
            f"packed must be uint8 of shape [N, {-(-K // 2)}] for {K} input features, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    N = packed.shape[0]
    expected = (N, -(-K // block_size))
    if scales.shape != expected:
        raise ValueError(
            f"scales must have shape {expected} for {N} x {K} weights in blocks of {block_size}, "
            f"got {tuple(scales.shape)}"
        )
    dtypes = SCALE_FORMATS[scale_format]
    if scales.dtype not in dtypes:
        hint = " (view float8 scales as uint8)" if dtypes == (torch.uint8,) else ""
        raise ValueError(
            f"{scale_format} scales must be {' / '.join(map(str, dtypes))}{hint}, got {scales.dtype}"
        )
    if global_scale is not None and (global_scale.dtype != torch.float32 or global_scale.numel() != 1):
        raise ValueError(
            f"global_scale must be a one-element float32 tensor, got {global_scale.dtype} "
            f"{tuple(global_scale.shape)}"
        )
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")

    dummy = packed  # stands in for absent global_scale/bias; the constexpr flags keep it unread
    return launch_gemm(
        _fp4_gemm_kernel, x, N,
        (packed, scales, dummy if global_scale is None else global_scale, dummy if bias is None else bias),
        (block_size,),
        (*packed.stride(), *scales.stride()),
        SCALE_FORMAT=scale_format, HAS_GLOBAL_SCALE=global_scale is not None, HAS_BIAS=bias is not None,
    )  # fmt: skip
