"""Bit packing: round trips for every width and odd shapes, and known bit layouts."""

from __future__ import annotations

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.formats.packing import pack_rows, packed_width, unpack_rows


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [1, 5, 10, 11, 31, 32, 33, 64, 100, 577])
def test_round_trip_every_width_and_odd_shapes(bits: int, cols: int) -> None:
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    codes = torch.randint(0, 2**bits, (7, cols), generator=gen)
    codes[0] = 2**bits - 1  # extremes survive
    codes[1] = 0
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, packed_width(cols, bits)) == (7, -(-cols * bits // 32))
    assert torch.equal(unpack_rows(packed, bits, cols).long(), codes)


def test_known_layout_4_bits() -> None:
    packed = pack_rows(torch.tensor([[1, 2, 3, 15, 0, 0, 0, 8]]), 4)
    assert packed.tolist() == [[int.from_bytes((0x80_00_F3_21).to_bytes(4, "little"), "little", signed=True)]]


def test_known_layout_3_bits_straddles_words() -> None:
    # Code 10 occupies bits 30..32: two bits in word 0, one bit in word 1.
    codes = torch.zeros(1, 11, dtype=torch.long)
    codes[0, 10] = 0b111
    packed = pack_rows(codes, 3)
    words = [w & 0xFFFFFFFF for w in packed[0].tolist()]
    assert words == [0b11 << 30, 0b1]


def test_out_of_range_codes_are_refused() -> None:
    with pytest.raises(QuantkitError, match="out of range"):
        pack_rows(torch.tensor([[16]]), 4)


def test_unpack_refuses_wrong_width() -> None:
    with pytest.raises(QuantkitError, match="does not hold"):
        unpack_rows(torch.zeros(2, 3, dtype=torch.int32), 4, 64)
