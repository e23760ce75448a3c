"""Quantizing the output head (``lm_head``), after the decoder: round-to-nearest at 8 or 4 bits.

The head of a small model is a large share of what decode reads (SmolLM2-135M's tied float32 head is 113 MB, more
than all its 4-bit decoder layers), and its input is the final norm's output, not a decoder block's, so it is
quantized on its own: symmetric RTN, per output row at 8 bits, in groups at 4 bits (the run's group size, else
:data:`INT4_GROUP_SIZE`). A head tied to the embeddings is untied first: the embeddings stay in float.
"""

from __future__ import annotations

from torch import nn

from quantkit.formats.base import QuantizedTensor
from quantkit.models.adapters import ModelAdapter
from quantkit.quantizers import LayerStats, make_quantizer
from quantkit.schemes import QuantScheme
from quantkit.transforms.prepare import untie_embeddings

HEAD_FORMATS = ("int8", "int4")
INT4_GROUP_SIZE = 128
HEAD_METHOD = "rtn"


def head_scheme(name: str, scheme: QuantScheme) -> QuantScheme:
    """The head's scheme for ``--quantize-head name`` in a run whose weights take ``scheme``."""
    if name == "int8":
        return QuantScheme(8, -1, True)
    grouped = scheme.format == "int" and scheme.group_size > 0
    return QuantScheme(4, scheme.group_size if grouped else INT4_GROUP_SIZE, True)


def quantize_head(model: nn.Module, adapter: ModelAdapter, scheme: QuantScheme) -> QuantizedTensor:
    """Quantize ``model``'s head in place (its weight becomes the dequantized one) and return the tensor."""
    untie_embeddings(model, adapter)
    head = model.get_submodule(adapter.lm_head)
    qt = make_quantizer(HEAD_METHOD).quantize(head.weight.detach().float(), LayerStats(), scheme)
    head.weight.data = qt.dequantize(head.weight.dtype)
    return qt
