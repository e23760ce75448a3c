"""FP4 number formats as data: the E2M1 element and the block-scale encodings (float16, E8M0, E4M3).

E2M1 (OCP MX v1.0 / NVIDIA): 1 sign, 2 exponent (bias 1) and 1 mantissa bit, no Inf or NaN; magnitudes
{0, 0.5, 1, 1.5, 2, 3, 4, 6}. A 4-bit code holds the sign in bit 3 and the magnitude's index in bits 0-2.
Rounding is to the nearest value, ties to the even mantissa, and saturates at ±6.

A block scale multiplies the elements of a block of columns. Its encoding is a :class:`ScaleCodec`:

- ``fp16``: the scale rounded to float16 (``fp4`` format).
- ``e8m0``: a power of two ``2**(b - 127)`` stored as the byte ``b`` (MXFP4). The exponent is the smallest
  that keeps the block maximum below 7 after scaling, i.e. ``amax / scale`` in ``[3.5, 7)``: the maximum
  then rounds to 6 with at most half a step of error. The OCP reference (``floor(log2 amax) - 2``, maximum in
  ``[4, 8)``) saturates everything in ``(6, 8)`` to 6; rounding up (``amax / scale`` in ``(3, 6]``) never
  saturates but wastes resolution; on SmolLM2's weights this rule has the lowest error of the three
  (``scripts/bench_fp4.py --scale-rules``).
- ``e4m3``: an FP8 E4M3 value (max 448, smallest 2**-9), round to nearest even (NVFP4), divided by the
  tensor's float32 ``global_scale`` (``448 * 6 / amax`` of the whole tensor, compressed-tensors' convention),
  so that block scales use the E4M3 range whatever the tensor's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import QuantkitError

E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
# Index of the nearest magnitude = how many midpoints lie below |x|. At a midpoint the even index wins, so
# midpoints above an even index count only when |x| passes them strictly, those above an odd index when reached.
_MIDPOINTS_STRICT = (0.25, 1.25, 2.5, 5.0)
_MIDPOINTS_REACHED = (0.75, 1.75, 3.5)
_E2M1_TABLE = torch.tensor(E2M1_MAGNITUDES + tuple(-m for m in E2M1_MAGNITUDES), dtype=torch.float32)

E4M3_MAX = 448.0
E4M3_MIN = 2.0**-9  # smallest subnormal: block scales never round to zero
E8M0_BIAS = 127
FP16_MIN = 2.0**-24


def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (uint8, sign in bit 3) of every element of ``x`` (finite), ties to even, saturating."""
    magnitude = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for midpoint in _MIDPOINTS_STRICT:
        index += magnitude > midpoint
    for midpoint in _MIDPOINTS_REACHED:
        index += magnitude >= midpoint
    return index | (torch.signbit(x).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """The float32 values of E2M1 codes."""
    return _E2M1_TABLE.to(codes.device)[codes.long()]


@dataclass(frozen=True)
class ScaleCodec:
    """How a block scale is chosen from the block maximum and stored."""

    name: str
    dtype: torch.dtype  # of the stored scale tensor

    def encode(self, amax: torch.Tensor) -> torch.Tensor:
        """The stored scale for blocks whose largest magnitude (after any global scale) is ``amax``."""
        if self.name == "fp16":
            return (amax / E2M1_MAX).clamp(FP16_MIN, torch.finfo(torch.float16).max).to(torch.float16)
        if self.name == "e4m3":
            return (amax / E2M1_MAX).clamp(E4M3_MIN, E4M3_MAX).to(torch.float8_e4m3fn)
        mantissa, exponent = torch.frexp(amax.float())  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
        # floor(log2 amax) - 2 puts amax/scale in [4, 8); step up once when it would reach 7.
        shared = exponent - 3 + (mantissa >= 7 / 8).to(exponent.dtype)
        shared = torch.where(amax > 0, shared, -E8M0_BIAS)
        return (shared.clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS).to(torch.uint8)

    def decode(self, stored: torch.Tensor) -> torch.Tensor:
        """The float32 scale a stored one stands for."""
        if self.name == "e8m0":
            return torch.ldexp(torch.ones(stored.shape, device=stored.device), stored.to(torch.int32) - E8M0_BIAS)
        return stored.float()

    def check(self, stored: torch.Tensor, what: str) -> None:
        """Refuse stored scales that are not positive finite numbers of this encoding."""
        if self.name == "e8m0":
            bad = stored == 255
        else:
            value = stored.float()
            bad = ~torch.isfinite(value) | (value <= 0)
        if bool(bad.any()):
            raise QuantkitError(f"{what} holds {int(bad.sum())} invalid {self.name} scale(s) (NaN, zero or negative)")


SCALE_CODECS = {
    "fp4": ScaleCodec("fp16", torch.float16),
    "mxfp4": ScaleCodec("e8m0", torch.uint8),
    "nvfp4": ScaleCodec("e4m3", torch.float8_e4m3fn),
}
TENSOR_SCALED = ("nvfp4",)  # formats with a float32 per-tensor scale


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """NVFP4's float32 divisor ``448 * 6 / amax`` (1 where ``amax`` is 0), for a tensor or per row."""
    amax = amax.float()
    scale = (E4M3_MAX * E2M1_MAX) / amax.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.where((amax > 0) & torch.isfinite(scale), scale, torch.ones_like(scale))
