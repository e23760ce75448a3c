"""QuantScheme: how one weight tensor is quantized (bits, grouping, symmetry, number format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantkit.errors import QuantkitError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_FORMATS = ("int",)


@dataclass(frozen=True)
class QuantScheme:
    """Integer weight quantization on a uniform grid.

    ``group_size`` counts input columns that share one scale and zero point; -1 means one group per
    output row (per-channel). ``symmetric`` follows GPTQ's convention: an unsigned grid whose zero point
    is fixed at the middle code, 2**(bits-1).
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    format: str = "int"

    def __post_init__(self) -> None:
        if self.format not in SUPPORTED_FORMATS:
            raise QuantkitError(f"unknown number format {self.format!r}; supported: {', '.join(SUPPORTED_FORMATS)}")
        if self.bits not in SUPPORTED_BITS:
            raise QuantkitError(f"unsupported bit width {self.bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise QuantkitError(f"group size must be a positive number of columns or -1, got {self.group_size}")

    @property
    def maxq(self) -> int:
        """The largest integer code."""
        return 2**self.bits - 1

    def num_groups(self, in_features: int) -> int:
        """How many groups of columns a row of ``in_features`` weights has (the last may be partial)."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def check_fits(self, name: str, in_features: int) -> None:
        """Refuse a group size larger than the layer it would be applied to."""
        if self.group_size > in_features:
            raise QuantkitError(
                f"group size {self.group_size} does not fit {name}: it has only {in_features} input columns"
            )

    def to_dict(self) -> dict:
        return asdict(self)
