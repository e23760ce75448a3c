"""Bit packing of integer codes into int32 words, row by row.

Each row of ``n`` codes of ``bits`` bits is laid out as one little-endian bit stream: code ``j`` occupies
bits ``[j*bits, (j+1)*bits)`` of the row, and the stream is cut into 32-bit words (stored as int32). Codes
may straddle two words (3 bits); the tail of the last word is zero.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    return -(-n * bits // 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a 2-D tensor of codes in ``[0, 2**bits)`` into int32 words along the last dimension."""
    if codes.dim() != 2:
        raise QuantkitError(f"pack_rows expects a 2-D tensor of codes, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 16:
        raise QuantkitError(f"cannot pack {bits}-bit codes")
    rows, n = codes.shape
    c = codes.to(torch.int64)
    if n and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise QuantkitError(f"codes out of range for {bits} bits")
    width = packed_width(n, bits)
    positions = torch.arange(n, dtype=torch.int64, device=codes.device) * bits
    word, shift = positions // 32, positions % 32
    words = torch.zeros(rows, width + 1, dtype=torch.int64, device=codes.device)
    # Low part goes into the code's own word; any bits that spill over go into the next word.
    words.index_add_(1, word, (c << shift) & 0xFFFFFFFF)
    words.index_add_(1, word + 1, c >> (32 - shift))
    words = words[:, :width]
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: recover ``n`` codes per row as uint8 (int16 above 8 bits)."""
    if packed.dim() != 2 or packed.dtype != torch.int32:
        raise QuantkitError(f"unpack_rows expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_width(n, bits):
        raise QuantkitError(
            f"packed width {packed.shape[1]} does not hold {n} codes of {bits} bits "
            f"(expected {packed_width(n, bits)} words)"
        )
    if 32 % bits == 0:
        return _unpack_aligned(packed, bits, n)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(words.shape[0], 1, dtype=torch.int64, device=words.device)], dim=1)
    positions = torch.arange(n, dtype=torch.int64, device=words.device) * bits
    word, shift = positions // 32, positions % 32
    low = words[:, word] >> shift
    high = words[:, word + 1] << (32 - shift)
    codes = (low | high) & (2**bits - 1)
    return codes.to(torch.uint8 if bits <= 8 else torch.int16)


def _unpack_aligned(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Fast path when codes never straddle words (2, 4, 8 bits): one shift-and-mask per code slot."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int32, device=packed.device) * bits
    codes = (packed[:, :, None] >> shifts) & (2**bits - 1)  # arithmetic shift; the mask drops sign bits
    return codes.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8 if bits <= 8 else torch.int16)


def pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack along the first dimension: column ``j`` of ``codes`` becomes column ``j`` of the packed words.

    ``[n, cols]`` codes give ``[ceil(n*bits/32), cols]`` words (GPTQ's ``qweight`` of transposed codes,
    compressed-tensors' zero points).
    """
    return pack_rows(codes.t(), bits).t().contiguous()


def unpack_columns(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_columns`: ``[n, cols]`` codes."""
    return unpack_rows(packed.t().contiguous(), bits, n).t().contiguous()


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``[rows, n]`` below 16 as bytes ``[rows, ceil(n/2)]``: even column in the low nibble, odd in the
    high one (compressed-tensors' FP4 packing, the CPU kernels' 4-bit one); an odd last column is padded with 0."""
    if codes.shape[1] % 2:
        codes = torch.cat([codes, codes.new_zeros(codes.shape[0], 1)], dim=1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[rows, n]`` uint8 codes."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != -(-n // 2):
        raise QuantkitError(f"packed 4-bit codes must be uint8 [rows, {-(-n // 2)}], got {packed.dtype} {list(packed.shape)}")
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :n]
