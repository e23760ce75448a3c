"""Fused dequantize + matmul in Triton for quantkit's native packed integer weights.

A linear layer with weight ``W [N, K]`` is stored as ``qweight`` int32 ``[N, ceil(K*bits/32)]`` (each row a
little-endian bit stream of codes), ``scales`` ``[N, G]``, ``qzeros`` int32 ``[N, ceil(G*bits/32)]`` packed the
same way along the group dimension, and an optional act-order ``g_idx [K]``. Column ``k`` dequantizes to
``scales[n, g(k)] * (code[n, k] - zero[n, g(k)])``. The kernels unpack and dequantize weight tiles in registers
and accumulate ``x @ W.T`` in float32. Only 2, 4 and 8 bits are handled (codes never straddle a word).
The code unpacking, the dot and the split-K launch are shared with :mod:`quantkit_kernels.triton_spqr`.

Triton is optional: without it ``TRITON_AVAILABLE`` is False and :func:`is_supported` answers no. On CPU
tensors the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1`` set before this import).
"""

from __future__ import annotations

from typing import Any

import torch

from quantkit.formats.packing import packed_width

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True

SUPPORTED_BITS = (2, 4, 8)
SMALL_M = 16  # at or below this many rows the split-K kernel is used


def is_supported(bits: int, device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run ``bits``-bit weights (on ``device``, when given)."""
    if not TRITON_AVAILABLE or bits not in SUPPORTED_BITS:
        return False
    if device is None:
        return True
    return torch.device(device).type == "cuda" or INTERPRETED


if TRITON_AVAILABLE:

    @triton.jit
    def unpack_codes(ptr, rows, cols, stride_row, stride_word, mask, BITS: tl.constexpr):
        """Codes ``[rows, cols]`` (broadcast 2-D indices) of a tensor packed row-wise; masked entries are 0."""
        PER_WORD: tl.constexpr = 32 // BITS
        words = tl.load(ptr + rows * stride_row + (cols // PER_WORD) * stride_word, mask=mask, other=0)
        return (words >> ((cols % PER_WORD) * BITS)) & ((1 << BITS) - 1)

    @triton.jit
    def dot_x(
        x_ptr, w, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    ):  # fmt: skip
        """``x[offs_m, offs_k] @ w`` in float32, with the float32 weight tile ``w`` rounded to x's dtype."""
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        w = w.to(x.dtype)
        if DOT_IN_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        return tl.dot(x, w, input_precision=DOT_PRECISION)

    @triton.jit
    def tile_coordinates(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's rows and columns of ``y`` with their masks, and its K slice ``pid_k``."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return offs_m, offs_n, offs_m < M, offs_n < N, tl.program_id(2)

    @triton.jit
    def store_tile(
        y_ptr, acc, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, pid_k,
        HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        """Store the float32 tile ``acc`` (plus the bias, added by K slice 0) into ``y``, or add it into a
        float32 ``y`` when K is split."""
        if HAS_BIAS:
            if pid_k == 0:
                acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y_ptrs, acc, mask=mask)

    @triton.jit
    def _dequant_tile(
        qw_ptr, s_ptr, qz_ptr, g_ptr,
        offs_k, offs_n, mask_k, mask_n,
        stride_qwn, stride_qwk, stride_sn, stride_sg, stride_qzn, stride_qzg,
        group_size,
        BITS: tl.constexpr, HAS_GIDX: tl.constexpr,
    ):  # fmt: skip
        """Dequantized weight tile ``W.T[offs_k, offs_n]`` in float32; masked entries are 0."""
        mask = mask_k[:, None] & mask_n[None, :]
        codes = unpack_codes(qw_ptr, offs_n[None, :], offs_k[:, None], stride_qwn, stride_qwk, mask, BITS)
        if HAS_GIDX:
            groups = tl.load(g_ptr + offs_k, mask=mask_k, other=0)
        else:
            groups = offs_k // group_size
        scales = tl.load(
            s_ptr + offs_n[None, :] * stride_sn + groups[:, None] * stride_sg, mask=mask, other=0.0
        )
        zeros = unpack_codes(qz_ptr, offs_n[None, :], groups[:, None], stride_qzn, stride_qzg, mask, BITS)
        return (codes - zeros).to(tl.float32) * scales.to(tl.float32)

    @triton.jit
    def _tile_dot(
        x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr,
        offs_m, offs_n, mask_m, mask_n, k0, K, group_size,
        stride_xm, stride_xk, stride_qwn, stride_qwk, stride_sn, stride_sg, stride_qzn, stride_qzg,
        BITS: tl.constexpr, HAS_GIDX: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """``x[offs_m, k0:k0+BLOCK_K] @ W.T[k0:k0+BLOCK_K, offs_n]`` in float32, weights rounded to x's dtype."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = _dequant_tile(
            qw_ptr, s_ptr, qz_ptr, g_ptr, offs_k, offs_n, mask_k, mask_n,
            stride_qwn, stride_qwk, stride_sn, stride_sg, stride_qzn, stride_qzg, group_size,
            BITS, HAS_GIDX,
        )  # fmt: skip
        return dot_x(
            x_ptr, w, offs_m, offs_k, mask_m, mask_k, stride_xm, stride_xk, DOT_PRECISION, DOT_IN_FP32
        )

    @triton.jit
    def _int_gemm_kernel(
        x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, b_ptr, y_ptr,
        M, N, K, group_size,
        stride_xm, stride_xk, stride_qwn, stride_qwk, stride_sn, stride_sg, stride_qzn, stride_qzg,
        stride_ym, stride_yn,
        BITS: tl.constexpr, HAS_GIDX: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):  # fmt: skip
        """One ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T (+ bias)``.

        With ``SPLIT_K == 1`` the program loops over all of K and stores its tile. With ``SPLIT_K > 1``
        (small M) program ``(m, n, s)`` takes K tiles ``s, s + SPLIT_K, ...`` and adds its partial tile into
        a float32 ``y`` that starts at zero.
        """
        offs_m, offs_n, mask_m, mask_n, pid_k = tile_coordinates(M, N, BLOCK_M, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
        for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
            acc += _tile_dot(
                x_ptr, qw_ptr, s_ptr, qz_ptr, g_ptr, offs_m, offs_n, mask_m, mask_n, k0, K, group_size,
                stride_xm, stride_xk, stride_qwn, stride_qwk, stride_sn, stride_sg, stride_qzn, stride_qzg,
                BITS, HAS_GIDX, DOT_PRECISION, DOT_IN_FP32, BLOCK_K,
            )  # fmt: skip
        store_tile(y_ptr, acc, b_ptr, offs_m, offs_n, mask_m, mask_n, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT_K)

    INTERPRETED = not isinstance(_int_gemm_kernel, triton.runtime.JITFunction)
else:
    INTERPRETED = False


def check_inputs(op: str, x: torch.Tensor, bits: int) -> None:
    """Raise unless triton is installed, ``bits`` is supported and ``x`` is a float16/bfloat16/float32 tensor."""
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{op} needs triton, which is not installed")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"{op} handles {SUPPORTED_BITS} bits, not {bits}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"{op} expects float16/bfloat16/float32 activations, got {x.dtype}")


def launch_gemm(
    kernel: triton.runtime.KernelInterface,
    x: torch.Tensor,
    n: int,
    tensors: tuple[torch.Tensor, ...],
    scalars: tuple[int | float, ...],
    strides: tuple[int, ...],
    **flags: Any,
) -> torch.Tensor:
    """Run a dequantize-GEMM ``kernel`` for ``x [..., K] @ W.T`` with ``W [n, K]``; ``[..., n]`` in ``x.dtype``.

    The kernel takes ``x, *tensors, y, M, N, K, *scalars, stride_xm, stride_xk, *strides, stride_ym,
    stride_yn``, the constexprs ``flags`` and DOT_PRECISION, DOT_IN_FP32, BLOCK_M, BLOCK_N, BLOCK_K and
    SPLIT_K. Up to :data:`SMALL_M` rows of ``x`` split K (partial tiles add into a zeroed float32 ``y``),
    more are tiled over M and N only.
    """
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    if M == 0:
        return x.new_empty(*lead, n)
    dot_in_fp32 = INTERPRETED and x.dtype == torch.bfloat16
    block_n, block_k = 64, 64
    n_tiles = triton.cdiv(n, block_n)
    if M <= SMALL_M:
        # Enough K slices to give the GPU ~128 programs, but each slice keeps at least two K tiles.
        block_m, split_k = 16, max(1, min(triton.cdiv(128, n_tiles), triton.cdiv(K, 2 * block_k)))
    else:
        block_m, split_k = (32 if M <= 32 else 64), 1
    if split_k > 1:
        y = torch.zeros((M, n), device=x.device, dtype=torch.float32)
    else:
        y = torch.empty((M, n), device=x.device, dtype=x.dtype)
    kernel[(triton.cdiv(M, block_m), n_tiles, split_k)](
        x2, *tensors, y, M, n, K, *scalars, *x2.stride(), *strides, *y.stride(),
        # The interpreter cannot multiply bfloat16 (triton-lang/triton#11584): it gets float32 operands.
        DOT_IN_FP32=dot_in_fp32,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or dot_in_fp32 else None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
        **flags,
    )  # fmt: skip
    return y.to(x.dtype).reshape(*lead, n)


def int_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for packed ``bits``-bit weights; ``x [..., K]`` gives ``[..., N]`` in ``x.dtype``.

    ``group_size`` -1 means one group per row; with ``g_idx`` (act-order) it is not used. Rows of ``x`` up to
    :data:`SMALL_M` go to the split-K kernel, more to the tiled GEMM kernel.
    """
    check_inputs("int_matmul", x, bits)
    K = x.shape[-1]
    N, G = scales.shape
    if qweight.shape != (N, packed_width(K, bits)) or qzeros.shape != (N, packed_width(G, bits)):
        raise ValueError(
            f"packed shapes qweight {tuple(qweight.shape)} / qzeros {tuple(qzeros.shape)} do not match "
            f"{N} x {K} weights with {G} groups of {bits} bits"
        )
    if g_idx is not None and g_idx.shape != (K,):
        raise ValueError(f"g_idx must have shape ({K},), got {tuple(g_idx.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape ({N},), got {tuple(bias.shape)}")

    dummy = qweight  # stands in for absent g_idx/bias; the constexpr flags keep it unread
    return launch_gemm(
        _int_gemm_kernel, x, N,
        (qweight, scales, qzeros, dummy if g_idx is None else g_idx, dummy if bias is None else bias),
        (K if group_size == -1 else group_size,),
        (*qweight.stride(), *scales.stride(), *qzeros.stride()),
        BITS=bits, HAS_GIDX=g_idx is not None, HAS_BIAS=bias is not None,
    )  # fmt: skip
