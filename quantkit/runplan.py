"""One resolved run: what a quantization (or an allocation) will do, built by one function for the Python API,
the command line and recipes alike (their defaults: :mod:`quantkit.defaults`)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from quantkit import defaults
from quantkit.actquant import InputQuantization, StaticActivations
from quantkit.allocation.options import AllocationOptions
from quantkit.allocation.plan import AllocationPlan
from quantkit.calib import check_source, default_windows
from quantkit.errors import OptionError, QuantkitError
from quantkit.kvcache import KVCacheQuantization
from quantkit.layouts import Layout, get_layout
from quantkit.progress import warn
from quantkit.quantizers import make_quantizer
from quantkit.quantizers.base import Quantizer
from quantkit.schemes import UNQUANTIZED_DTYPES, QuantScheme
from quantkit.transforms.base import AppliedTransform, Transform


@dataclass
class CalibrationSpec:
    """Where calibration windows come from and how many; unset sizes take the source's defaults
    (:func:`quantkit.calib.default_windows`)."""

    source: str = defaults.CALIBRATION
    nsamples: int | None = None
    seqlen: int | None = None
    data_dir: str | None = None
    # a routed expert calibration sends fewer tokens is starved: its statistics come from all the block's tokens
    expert_min_tokens: int = defaults.EXPERT_MIN_TOKENS

    def __post_init__(self) -> None:
        nsamples, seqlen = default_windows(self.source)
        self.nsamples = nsamples if self.nsamples is None else self.nsamples
        self.seqlen = seqlen if self.seqlen is None else self.seqlen

    def check(self) -> None:
        """Refuse, before any model loads, a source that cannot be read (see :func:`quantkit.calib.check_source`)."""
        check_source(self.source, self.data_dir)


Allocation = AllocationOptions | AllocationPlan | None


@dataclass(frozen=True)
class RunPlan:
    """A run with every choice made: the method and its quantizer (built once), the weight scheme and every
    scheme a linear may get, activations, calibration, transform, allocation and the checkpoint's layout and
    dtype; checked against each other before any model is read."""

    method: str
    quantizer: Quantizer
    scheme: QuantScheme
    candidates: tuple[QuantScheme, ...]
    calibration: CalibrationSpec
    seed: int
    true_sequential: bool
    layout: str
    dtype: str
    act_scheme: QuantScheme | None
    transform: Transform | AppliedTransform | None
    allocation: Allocation
    act_static: StaticActivations | None = None
    kv_cache: KVCacheQuantization | None = None
    head: QuantScheme | None = None  # the output head's scheme when it is quantized (see quantkit.head)
    forward_dtype: str = defaults.FORWARD_DTYPE  # of calibration's forward passes through the blocks

    @property
    def forward_torch_dtype(self) -> torch.dtype | None:
        """The autocast dtype of calibration's forward passes (None: the model's own arithmetic)."""
        return None if self.forward_dtype == "float32" else getattr(torch, self.forward_dtype)

    @property
    def writer(self) -> Layout:
        """The layout the checkpoint is written in."""
        return get_layout(self.layout)

    @property
    def inputs(self) -> InputQuantization | None:
        """How the quantized linears' inputs are quantized (None: weight-only)."""
        return None if self.act_scheme is None else InputQuantization(self.act_scheme, self.act_static)


def runtime_refusals(writer: Layout, schemes: list[QuantScheme], column_groups: list[bool]) -> list[str]:
    """One line for each known runtime that will refuse ``writer``'s checkpoint of ``schemes`` (each with or without
    act-order groups), each line once."""
    return list(dict.fromkeys(line for scheme, grouped in zip(schemes, column_groups)
                              for line in writer.refusing_runtimes(scheme, grouped)))


def warn_runtimes(writer: Layout, schemes: list[QuantScheme], column_groups: list[bool]) -> None:
    """Warn, once per line, of every known runtime that will refuse ``writer``'s checkpoint of ``schemes``."""
    _warn_once(runtime_refusals(writer, schemes, column_groups))


def warn_moe_runtimes(writer: Layout, schemes: list[QuantScheme]) -> None:
    """Warn, once per line, of every known runtime that will refuse routed experts of ``schemes`` in ``writer``'s
    checkpoint (for a model with experts)."""
    _warn_once([line for scheme in schemes for line in writer.refusing_moe_runtimes(scheme)])


def _warn_once(lines: list[str]) -> None:
    for line in dict.fromkeys(lines):
        warn(line)


def unquantized_dtype(name: str, source: torch.dtype) -> torch.dtype:
    """The dtype ``--dtype name`` keeps unquantized tensors in (``auto``: ``source``, the model's own)."""
    if name not in UNQUANTIZED_DTYPES:
        raise OptionError(f"--dtype {name!r} is not allowed; allowed: {', '.join(UNQUANTIZED_DTYPES)}")
    return source if name == "auto" else getattr(torch, name)


def candidate_schemes(scheme: QuantScheme, allocation: Allocation) -> list[QuantScheme]:
    """Every scheme the linears may get: ``scheme`` alone, or at each width the allocation may choose."""
    if allocation is None:
        return [scheme]
    if scheme.is_float:
        raise QuantkitError(f"mixed bit widths need an integer grid; {scheme.format} has 4-bit elements only")
    return [replace(scheme, bits=bits) for bits in allocation.bit_choices]


def plan_run(
    method: str = defaults.METHOD,
    scheme: QuantScheme | None = None,
    *,
    bits: int | None = None,
    group_size: int | None = None,
    block_rows: int | None = None,
    symmetric: bool | None = None,
    number_format: str = defaults.NUMBER_FORMAT,
    calibration: CalibrationSpec | None = None,
    seed: int = defaults.SEED,
    true_sequential: bool = defaults.TRUE_SEQUENTIAL,
    layout: str = defaults.LAYOUT,
    dtype: str = defaults.DTYPE,
    act_scheme: QuantScheme | None = None,
    transform: Transform | AppliedTransform | None = None,
    allocation: Allocation = None,
    act_static: StaticActivations | None = None,
    kv_cache: KVCacheQuantization | None = None,
    quantize_head: str | None = None,
    forward_dtype: str = defaults.FORWARD_DTYPE,
    **quantizer_options,
) -> RunPlan:
    """The one way a run is resolved. ``scheme`` (else ``bits`` in ``number_format`` with the method's usual
    group size and symmetry where not given, ``block_rows`` output rows sharing a scale; an allocation's smallest width by default) and every scheme an
    allocation may choose are checked against the quantizer and the layout, with the activations and the
    transform's online maps, before anything is loaded. ``act_static`` calibrates static scales for
    ``act_scheme`` (see :mod:`quantkit.actcalib`); ``kv_cache`` calibrates static KV-cache scales
    (:mod:`quantkit.kvcache`); ``quantize_head`` (int8 or int4) quantizes the output head too
    (:mod:`quantkit.head`). ``forward_dtype`` is the dtype calibration's forward passes run in
    (:data:`quantkit.defaults.FORWARD_DTYPES`)."""
    if forward_dtype not in defaults.FORWARD_DTYPES:
        raise OptionError(f"unknown forward dtype {forward_dtype!r}; choose one of {', '.join(defaults.FORWARD_DTYPES)}")
    quantizer = make_quantizer(method, **quantizer_options)
    if act_static is not None:
        if act_scheme is None:
            raise OptionError("static activation scales need --act-bits")
        act_static.check_scheme(act_scheme)
    inputs = None if act_scheme is None else InputQuantization(act_scheme, act_static)
    if isinstance(transform, Transform):
        transform.check(act_scheme)
    if scheme is None:
        if bits is None and allocation is not None and number_format == "int":
            bits = allocation.bit_choices[0]
        scheme = quantizer.default_scheme(bits, group_size, symmetric, number_format, block_rows or 1)
    candidates = candidate_schemes(scheme, allocation)
    writer = get_layout(layout)
    for candidate in candidates:
        quantizer.check_scheme(candidate)
        writer.check(quantizer.plan(candidate), activations=inputs,
                     online=transform is not None and transform.has_online())
    if kv_cache is not None:
        writer.check_kv_cache(kv_cache)
    head = None
    if quantize_head is not None:
        head = _head_plan(quantize_head, scheme, act_scheme, writer)
    warn_runtimes(writer, candidates, [quantizer.plan(c).column_groups for c in candidates])
    unquantized_dtype(dtype, torch.float32)  # refused before any work
    return RunPlan(method, quantizer, scheme, tuple(candidates), calibration or CalibrationSpec(), seed,
                   true_sequential, layout, dtype, act_scheme, transform, allocation, act_static, kv_cache, head,
                   forward_dtype)


def _head_plan(name: str, scheme: QuantScheme, act_scheme: QuantScheme | None, writer: Layout) -> QuantScheme:
    """The output head's scheme for ``--quantize-head name``, refused where the run or the layout cannot carry it."""
    from quantkit.head import HEAD_FORMATS, HEAD_METHOD, head_scheme

    if name not in HEAD_FORMATS:
        raise OptionError(f"--quantize-head takes {' or '.join(HEAD_FORMATS)}, not {name!r}")
    if act_scheme is not None:
        raise OptionError("--quantize-head is weight-only: it cannot be combined with --act-bits (the head's input "
                          "would be quantized too)")
    head = head_scheme(name, scheme)
    writer.check(make_quantizer(HEAD_METHOD).plan(head))
    return head
