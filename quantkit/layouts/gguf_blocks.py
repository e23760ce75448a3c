"""llama.cpp's block structs: a :class:`GGUFQuantizedTensor`'s codes and scales as the bytes GGUF stores.

Per block of 32 columns (in a row's order, little-endian):

- ``q8_0`` (34 bytes): float16 ``d``, then the 32 codes as int8 (``q - 128``).
- ``q4_0`` (18 bytes): float16 ``d``, then 16 bytes; byte ``j`` holds code ``j`` in its low nibble and code
  ``j + 16`` in its high nibble.
- ``q5_0`` (22 bytes): float16 ``d``, a 32-bit word whose bit ``j`` is the fifth bit of code ``j``, then the low
  nibbles as in ``q4_0``.

Per super-block of 256 columns, ``q4_k`` (144 bytes): float16 ``d`` and ``dmin``; 12 bytes holding the eight
6-bit scales and mins (blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, blocks 4-7 split into a low nibble in
bytes 8-11 and two high bits in the top of bytes 0-3 / 4-7); then 128 bytes, 32 per pair of blocks, byte ``l``
holding column ``l`` of the pair's first block in its low nibble and column ``l`` of the second in its high one.
"""

from __future__ import annotations

import numpy as np
import torch

from quantkit.formats.gguf import GGUFQuantizedTensor
from quantkit.schemes import K_SUPER_BLOCK


def _half_bytes(x: torch.Tensor) -> np.ndarray:
    """float16 values ``[..., n]`` as their bytes ``[..., 2n]``."""
    return x.to(torch.float16).contiguous().numpy().view(np.uint8)


def _nibble_pairs(codes: np.ndarray) -> np.ndarray:
    """Codes ``[..., 32]`` as 16 bytes: code ``j`` low, code ``j + 16`` high."""
    return (codes[..., :16] & 0xF) | ((codes[..., 16:] & 0xF) << 4)


def _k_scale_bytes(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``[..., 8]`` as q4_k's 12 bytes."""
    packed = np.empty((*sc.shape[:-1], 12), dtype=np.uint8)
    packed[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = m[..., :4] | ((m[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 0xF) | ((m[..., 4:] & 0xF) << 4)
    return packed


def block_bytes(qt: GGUFQuantizedTensor) -> np.ndarray:
    """The tensor's rows as GGUF block bytes, ``uint8 [out, bytes per row]``."""
    rows, in_features = qt.shape
    codes = qt.codes.to(torch.uint8).numpy()
    fmt = qt.scheme.format
    if fmt == "q4_k":
        supers = in_features // K_SUPER_BLOCK
        pairs = codes.reshape(rows, supers, 4, 2, 32)
        qs = (pairs[:, :, :, 0] | (pairs[:, :, :, 1] << 4)).reshape(rows, supers, 128)
        scales = _k_scale_bytes(qt.sc.numpy().reshape(rows, supers, 8), qt.m.numpy().reshape(rows, supers, 8))
        d = _half_bytes(qt.d[..., None]).reshape(rows, supers, 2)
        dmin = _half_bytes(qt.dmin[..., None]).reshape(rows, supers, 2)
        return np.concatenate([d, dmin, scales, qs], axis=-1).reshape(rows, -1)
    blocks = codes.reshape(rows, in_features // 32, 32)
    d = _half_bytes(qt.d[..., None]).reshape(rows, -1, 2)
    if fmt == "q8_0":
        body = (blocks.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
    elif fmt == "q4_0":
        body = _nibble_pairs(blocks)
    else:  # q5_0
        high = ((blocks >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        qh = high.sum(axis=-1, dtype=np.uint32).astype("<u4")[..., None].view(np.uint8)
        body = np.concatenate([qh, _nibble_pairs(blocks)], axis=-1)
    return np.concatenate([d, body], axis=-1).reshape(rows, -1)
