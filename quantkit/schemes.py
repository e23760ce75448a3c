"""QuantScheme: how one tensor is quantized (bits, grouping, symmetry, number format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from quantkit import defaults
from quantkit.errors import QuantkitError

SUPPORTED_BITS = (2, 3, 4, 8)
# Number formats. ``int``: a uniform grid with a float16 scale and an integer zero point per group.
# The others are E2M1 (4-bit float) elements with a scale per block of columns: ``fp4`` a float16 scale
# over any group size, ``mxfp4`` an E8M0 power of two over 32 columns, ``nvfp4`` an E4M3 scale over 16
# columns divided by one float32 scale per tensor.
FLOAT_FORMATS = ("fp4", "mxfp4", "nvfp4")
# FP8: E4M3 elements (max 448) with a float32 scale per group of columns (or output channel), optionally shared by
# a block of output rows (2-D blocks such as 128x128, or one scale per tensor); 8 bits, symmetric.
FP8_FORMAT = "fp8"
# GGUF's block formats under llama.cpp's names, (bits, symmetric) fixed by each: blocks of 32 input columns with a
# float16 scale (``q8_0``, ``q5_0``, ``q4_0``); ``q4_k`` also groups 8 blocks in a super-block of 256 columns
# whose float16 scales quantize each block's scale and min to 6 bits. See :mod:`quantkit.formats.gguf`.
GGUF_FORMATS = {"q8_0": (8, True), "q5_0": (5, True), "q4_0": (4, True), "q4_k": (4, False)}
K_SUPER_BLOCK = 256
# The format a layer takes instead when its row length is no multiple of the super-block (llama.cpp's choice).
GGUF_FALLBACK = {"q4_k": "q5_0"}
SUPPORTED_FORMATS = ("int", *FLOAT_FORMATS, FP8_FORMAT, *GGUF_FORMATS)
FIXED_BLOCK = {"mxfp4": 32, "nvfp4": 16, **dict.fromkeys(GGUF_FORMATS, 32)}  # formats whose block size is part of the format
FP4_DEFAULT_GROUP = 32
CHECKPOINT_LAYOUTS = ("native", "gptq", "compressed-tensors", "gguf")
# The dtype a checkpoint keeps its unquantized tensors in (embeddings, norms, head, biases); auto: the source's.
UNQUANTIZED_DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantScheme:
    """A number format for weights (or activations) and how its scales are shared.

    ``group_size`` counts input columns that share one scale (and, for ``int``, a zero point); -1 means one
    group per row (per-channel, or per-token for activations). ``block_rows`` counts output rows that share it
    (fp8 only): 1 (each row its own), a block height (128 with group size 128: 128x128 blocks), or -1 (every
    row: with group size -1, one scale per tensor). ``symmetric`` follows GPTQ's convention for
    ``int``: an unsigned grid whose zero point is fixed at the middle code, 2**(bits-1). Float formats are
    4-bit and symmetric by construction (a sign bit).
    """

    bits: int = defaults.BITS
    group_size: int = 128
    symmetric: bool = True
    format: str = defaults.NUMBER_FORMAT
    block_rows: int = 1

    def __post_init__(self) -> None:
        if self.format not in SUPPORTED_FORMATS:
            hint = f" ({self.format} is a checkpoint layout: use --layout)" if self.format in CHECKPOINT_LAYOUTS else ""
            raise QuantkitError(f"unknown number format {self.format!r}{hint}; supported: {', '.join(SUPPORTED_FORMATS)}")
        if self.format in GGUF_FORMATS:
            bits, symmetric = GGUF_FORMATS[self.format]
            if (self.bits, self.symmetric) != (bits, symmetric):
                raise QuantkitError(f"{self.format} has {bits}-bit {'symmetric' if symmetric else 'asymmetric'} codes; "
                                    f"got {self.bits} bits, {'sym' if self.symmetric else 'asym'}")
        elif self.bits not in SUPPORTED_BITS:
            raise QuantkitError(f"unsupported bit width {self.bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size != -1 and self.group_size < 1:
            raise QuantkitError(f"group size must be a positive number of columns or -1, got {self.group_size}")
        if self.block_rows != 1:
            if self.format != FP8_FORMAT:
                raise QuantkitError(f"output rows share weight scales (block rows {self.block_rows}) in fp8 only, "
                                    f"not {self.format}")
            if self.block_rows < -1 or self.block_rows == 0:
                raise QuantkitError(f"block rows must be a positive number of rows or -1, got {self.block_rows}")
        if self.format == FP8_FORMAT and (self.bits != 8 or not self.symmetric):
            raise QuantkitError(f"fp8 has 8-bit symmetric (E4M3) elements; got {self.bits} bits, "
                                f"{'sym' if self.symmetric else 'asym'}")
        if self.is_float:
            if self.bits != 4:
                raise QuantkitError(f"{self.format} has 4-bit (E2M1) elements, not {self.bits}-bit")
            if not self.symmetric:
                raise QuantkitError(f"{self.format} is symmetric (E2M1 has a sign bit); drop --asym")
        block = FIXED_BLOCK.get(self.format)
        if block is not None and self.group_size != block:
            raise QuantkitError(f"{self.format} scales blocks of {block} columns; got group size {self.group_size}")

    @classmethod
    def for_format(cls, fmt: str, bits: int | None, group_size: int | None, symmetric: bool | None,
                   default_group_size: int, default_symmetric: bool, block_rows: int = 1) -> QuantScheme:
        """A scheme in number format ``fmt``; unset bits, group size and symmetry take the format's defaults,
        or the given ones (and :data:`defaults.BITS`) for ``int``."""
        default_bits = defaults.BITS
        if fmt == FP8_FORMAT:
            default_bits, default_symmetric = 8, True
        if fmt in FLOAT_FORMATS:
            default_group_size, default_symmetric = FIXED_BLOCK.get(fmt, FP4_DEFAULT_GROUP), True
        if fmt in GGUF_FORMATS:
            (default_bits, default_symmetric), default_group_size = GGUF_FORMATS[fmt], FIXED_BLOCK[fmt]
        return cls(
            bits=default_bits if bits is None else bits,
            group_size=default_group_size if group_size is None else group_size,
            symmetric=default_symmetric if symmetric is None else symmetric,
            format=fmt,
            block_rows=block_rows,
        )

    @property
    def is_float(self) -> bool:
        """Whether elements are E2M1 floats rather than integer codes."""
        return self.format in FLOAT_FORMATS

    @property
    def is_fp8(self) -> bool:
        """Whether elements are E4M3 floats."""
        return self.format == FP8_FORMAT

    @property
    def is_gguf(self) -> bool:
        """Whether it is one of GGUF's block formats."""
        return self.format in GGUF_FORMATS

    def for_columns(self, in_features: int) -> QuantScheme:
        """The scheme a layer of ``in_features`` inputs takes: itself, or the fallback of a super-block format
        whose super-block does not divide the row."""
        if self.format in GGUF_FALLBACK and in_features % K_SUPER_BLOCK:
            return QuantScheme.for_format(GGUF_FALLBACK[self.format], None, None, None, self.group_size, self.symmetric)
        return self

    @property
    def maxq(self) -> int:
        """The largest integer code."""
        return 2**self.bits - 1

    def group_columns(self, in_features: int) -> int:
        """Columns per group in a row of ``in_features`` (the whole row when per-channel)."""
        return in_features if self.group_size == -1 else self.group_size

    def num_groups(self, in_features: int) -> int:
        """How many groups of columns a row of ``in_features`` weights has (the last may be partial)."""
        return -(-in_features // self.group_columns(in_features))

    def row_block(self, out_features: int) -> int:
        """Output rows sharing one scale in a tensor of ``out_features`` rows (all of them with ``block_rows -1``)."""
        return out_features if self.block_rows == -1 else self.block_rows

    def num_row_blocks(self, out_features: int) -> int:
        """How many blocks of rows share scales (the last may be partial): the scale tensor's first dimension."""
        return -(-out_features // self.row_block(out_features))

    def group_slices(self, in_features: int) -> list[slice]:
        """Column ranges of consecutive groups; the last one may be partial."""
        size = self.group_columns(in_features)
        return [slice(start, min(start + size, in_features)) for start in range(0, in_features, size)]

    def check_fits(self, name: str, in_features: int) -> None:
        """Refuse a group size larger than the layer it would be applied to (fixed float blocks are padded;
        GGUF's blocks must divide the row)."""
        if self.is_gguf and in_features % self.group_size:
            raise QuantkitError(f"{self.format} stores blocks of {self.group_size} columns, which do not divide the "
                                f"{in_features} inputs of {name}")
        if self.group_size > in_features and self.format not in FIXED_BLOCK:
            raise QuantkitError(
                f"group size {self.group_size} does not fit {name}: it has only {in_features} input columns"
            )

    def to_dict(self) -> dict:
        """Its fields; ``block_rows`` only where rows share scales, so row-wise records stay as they were."""
        record = asdict(self)
        if self.block_rows == 1:
            del record["block_rows"]
        return record

    @classmethod
    def from_dict(cls, record: dict) -> QuantScheme:
        """The scheme a :meth:`to_dict` record (or a layer meta holding its keys) describes."""
        keys = ("bits", "group_size", "symmetric", "format", "block_rows")
        return cls(**{key: record[key] for key in keys if key in record})
