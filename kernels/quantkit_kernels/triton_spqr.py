"""Fused dequantize + matmul in Triton for SpQR's dense part: codes with quantized group statistics.

A layer with weight ``W [N, K]`` stores ``bits``-bit codes in ``qweight`` int32 ``[N, ceil(K*bits/32)]`` (packed
like :mod:`quantkit_kernels.triton_int`). Column ``k`` is in group ``g = k // group_size`` and row ``n`` in
statistics block ``r = n // stat_group_size``. The per-``(g, n)`` scale and zero are themselves quantized:
uint8 codes ``[G, N]`` with float scales and zeros ``[G, R]`` per ``(g, r)``, so in float32

    s = max(scale_scale[g, r] * (scale_codes[g, n] - scale_zero[g, r]), min_scale)
    z = zero_scale[g, r] * (zero_codes[g, n] - zero_zero[g, r])      (2**(bits-1) when symmetric)
    W[n, k] = s * (code[n, k] - z)

The kernel dequantizes weight tiles in registers and accumulates ``x @ W.T`` in float32; it shares the code
unpacking, the dot and the split-K launch with ``triton_int``. SpQR's sparse outliers are not handled here.
"""

from __future__ import annotations

import torch

from quantkit.formats.packing import packed_width
from quantkit_kernels.triton_int import INTERPRETED, TRITON_AVAILABLE, check_inputs, is_supported, launch_gemm

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    from quantkit_kernels.triton_int import dot_x, store_tile, tile_coordinates, unpack_codes

__all__ = ["INTERPRETED", "TRITON_AVAILABLE", "is_supported", "spqr_matmul"]

if TRITON_AVAILABLE:

    @triton.jit
    def _second_level(codes_ptr, scale_ptr, zero_ptr, code_offs, stat_offs, mask):
        """``scale * (code - zero)`` of a quantized statistic in float32; masked entries are 0."""
        codes = tl.load(codes_ptr + code_offs, mask=mask, other=0).to(tl.float32)
        scale = tl.load(scale_ptr + stat_offs, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + stat_offs, mask=mask, other=0.0).to(tl.float32)
        return scale * (codes - zero)

    @triton.jit
    def _spqr_dequant_tile(
        qw_ptr, sc_ptr, ss_ptr, sz_ptr, zc_ptr, zs_ptr, zz_ptr,
        offs_k, offs_n, mask_k, mask_n,
        stride_qwn, stride_qwk, stride_cg, stride_cn, stride_sg, stride_sr,
        group_size, stat_group_size, min_scale,
        BITS: tl.constexpr, SYMMETRIC: tl.constexpr,
    ):  # fmt: skip
        """Dequantized weight tile ``W.T[offs_k, offs_n]`` in float32; masked entries are finite."""
        mask = mask_k[:, None] & mask_n[None, :]
        codes = unpack_codes(qw_ptr, offs_n[None, :], offs_k[:, None], stride_qwn, stride_qwk, mask, BITS)
        groups = (offs_k // group_size)[:, None]
        code_offs = groups * stride_cg + offs_n[None, :] * stride_cn
        stat_offs = groups * stride_sg + (offs_n // stat_group_size)[None, :] * stride_sr
        scales = tl.maximum(_second_level(sc_ptr, ss_ptr, sz_ptr, code_offs, stat_offs, mask), min_scale)
        if SYMMETRIC:
            zeros = 1 << (BITS - 1)
        else:
            zeros = _second_level(zc_ptr, zs_ptr, zz_ptr, code_offs, stat_offs, mask)
        return scales * (codes.to(tl.float32) - zeros)

    @triton.jit
    def _spqr_gemm_kernel(
        x_ptr, qw_ptr, sc_ptr, ss_ptr, sz_ptr, zc_ptr, zs_ptr, zz_ptr, y_ptr,
        M, N, K, group_size, stat_group_size, min_scale,
        stride_xm, stride_xk, stride_qwn, stride_qwk, stride_cg, stride_cn, stride_sg, stride_sr,
        stride_ym, stride_yn,
        BITS: tl.constexpr, SYMMETRIC: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        """One ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T`` over K tiles ``pid_k, pid_k + SPLIT_K, ...``."""
        offs_m, offs_n, mask_m, mask_n, pid_k = tile_coordinates(M, N, BLOCK_M, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = _spqr_dequant_tile(
                qw_ptr, sc_ptr, ss_ptr, sz_ptr, zc_ptr, zs_ptr, zz_ptr, offs_k, offs_n, mask_k, mask_n,
                stride_qwn, stride_qwk, stride_cg, stride_cn, stride_sg, stride_sr,
                group_size, stat_group_size, min_scale, BITS, SYMMETRIC,
            )  # fmt: skip
            acc += dot_x(
                x_ptr, w, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, DOT_PRECISION, DOT_IN_FP32
            )
        store_tile(y_ptr, acc, y_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, pid_k, False, SPLIT_K)


def spqr_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale_codes: torch.Tensor,
    scale_scale: torch.Tensor,
    scale_zero: torch.Tensor,
    zero_codes: torch.Tensor | None,
    zero_scale: torch.Tensor | None,
    zero_zero: torch.Tensor | None,
    bits: int,
    group_size: int,
    stat_group_size: int,
    symmetric: bool,
    min_scale: float,
) -> torch.Tensor:
    """``x @ W.T`` for an SpQR layer's dense part; ``x [..., K]`` gives ``[..., N]`` in ``x.dtype``.

    ``scale_codes``/``zero_codes`` are uint8 ``[G, N]``, the other statistics float ``[G, R]`` with
    ``G = ceil(K / group_size)`` (1 when ``group_size`` is -1) and ``R = ceil(N / stat_group_size)``. The zero
    tensors are None exactly when ``symmetric``. Rows of ``x`` up to ``triton_int.SMALL_M`` split K.
    """
    check_inputs("spqr_matmul", x, bits)
    if group_size == 0 or group_size < -1 or stat_group_size < 1:
        raise ValueError(f"invalid group sizes {group_size} / {stat_group_size}")
    if scale_codes.dim() != 2:
        raise ValueError(f"scale_codes must be 2-D [groups, rows], got shape {tuple(scale_codes.shape)}")
    K = x.shape[-1]
    G, N = scale_codes.shape
    R = -(-N // stat_group_size)
    expected_groups = 1 if group_size == -1 else -(-K // group_size)
    if G != expected_groups:
        raise ValueError(
            f"scale_codes has {G} groups; {K} columns in groups of {group_size} need {expected_groups}"
        )
    if qweight.dtype != torch.int32 or qweight.shape != (N, packed_width(K, bits)):
        raise ValueError(
            f"qweight must be int32 of shape {(N, packed_width(K, bits))} for {N} x {K} weights of {bits} bits, "
            f"got {qweight.dtype} {tuple(qweight.shape)}"
        )
    zeros = (zero_codes, zero_scale, zero_zero)
    if symmetric:
        if any(t is not None for t in zeros):
            raise ValueError("zero_codes, zero_scale and zero_zero must be None when symmetric")
        # Stand-ins for the absent zero tensors; the SYMMETRIC flag keeps them unread.
        zero_codes, zero_scale, zero_zero = scale_codes, scale_scale, scale_zero
    elif any(t is None for t in zeros):
        raise ValueError("asymmetric spqr_matmul needs zero_codes, zero_scale and zero_zero")
    for name, codes in (("scale_codes", scale_codes), ("zero_codes", zero_codes)):
        if codes.dtype != torch.uint8 or codes.shape != (G, N):
            raise ValueError(
                f"{name} must be uint8 of shape {(G, N)}, got {codes.dtype} {tuple(codes.shape)}"
            )
    stats = {
        "scale_scale": scale_scale,
        "scale_zero": scale_zero,
        "zero_scale": zero_scale,
        "zero_zero": zero_zero,
    }
    for name, stat in stats.items():
        if not stat.is_floating_point() or stat.shape != (G, R):
            raise ValueError(
                f"{name} must be a float tensor of shape {(G, R)}, got {stat.dtype} {tuple(stat.shape)}"
            )

    # Each kind of statistic shares one pair of strides, so the (tiny) tensors are made contiguous.
    scale_codes, zero_codes, scale_scale, scale_zero, zero_scale, zero_zero = (
        t.contiguous() for t in (scale_codes, zero_codes, *stats.values())
    )
    return launch_gemm(
        _spqr_gemm_kernel, x, N,
        (qweight, scale_codes, scale_scale, scale_zero, zero_codes, zero_scale, zero_zero),
        (K if group_size == -1 else group_size, stat_group_size, float(min_scale)),
        (*qweight.stride(), *scale_codes.stride(), *scale_scale.stride()),
        BITS=bits, SYMMETRIC=symmetric,
    )  # fmt: skip
