"""Turning resolved settings (a recipe merged with flags) into the arguments of :func:`quantkit.api.quantize`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit.errors import OptionError
from quantkit.recipes.fields import ALLOCATION_OPTIONS, BY_PARAM, QUANTIZER_OPTIONS, TRANSFORM_OPTIONS
from quantkit.schemes import SUPPORTED_BITS

if TYPE_CHECKING:
    from quantkit.allocation.options import AllocationOptions
    from quantkit.allocation.plan import AllocationPlan

DEFAULT_BIT_CHOICES = (2, 3, 4, 8)


def allocation_options(bits: float, settings: dict[str, object], strategy: str) -> AllocationOptions:
    """The mixed-bits allocation named by ``settings`` under a target of ``bits``."""
    from quantkit.allocation.options import CPU_SEARCH, AllocationOptions

    choices = tuple(settings["bit_choices"] or DEFAULT_BIT_CHOICES)
    search = replace(CPU_SEARCH, **{key: settings[f"search_{key}"] for key in ("generations", "offspring")
                                    if settings[f"search_{key}"] is not None})
    granularity = settings["granularity"] or ("linear" if settings["layout"] == "native" else "group")
    return AllocationOptions(bits, choices, strategy, settings["score"], granularity, search, seed=settings["seed"])


def _allocation(settings: dict[str, object]) -> tuple[AllocationOptions | AllocationPlan | None, int]:
    """The allocation (none, options, or a plan file) and the width of the base scheme."""
    from quantkit.allocation.plan import AllocationPlan

    allocation, bits = settings["allocation"], settings["bits"]
    given = [BY_PARAM[param].flag for param in ALLOCATION_OPTIONS if settings[param] is not None]
    if allocation is not None and Path(str(allocation)).suffix == ".json":
        if given or bits is not None:
            raise OptionError(f"{(given or ['--bits'])[0]} cannot change a saved allocation plan; "
                                "make a new one with `quantkit allocate`")
        plan = AllocationPlan.load(Path(str(allocation)))
        return plan, plan.bit_choices[0]
    if allocation is not None:
        options = allocation_options(4 if bits is None else bits, settings, str(allocation))
        return options, options.bit_choices[0]
    if given:
        raise OptionError(f"{given[0]} needs --allocation")
    bits = 4 if bits is None else bits
    if bits not in SUPPORTED_BITS:
        raise OptionError(f"--bits {bits:g} is not allowed; allowed: {', '.join(map(str, SUPPORTED_BITS))} "
                          "(an average such as 3.5 needs --allocation)")
    return None, int(bits)


def quantize_arguments(settings: dict[str, object]) -> dict[str, object]:
    """Keyword arguments of :func:`quantkit.api.quantize` (all but the model, output and overwrite)."""
    from quantkit.actquant import activation_scheme
    from quantkit.api import CalibrationSpec
    from quantkit.quantizers import make_quantizer
    from quantkit.transforms import make_transform

    options = {name: settings[name] for name in QUANTIZER_OPTIONS}
    allocation, base_bits = _allocation(settings)
    if allocation is not None and settings["number_format"] != "int":  # the API refuses it, saying why
        base_bits = 4
    scheme = make_quantizer(settings["method"], **options).default_scheme(
        base_bits, settings["group_size"], settings["sym"], settings["number_format"])
    act_scheme = None
    if settings["act_bits"] is not None:
        default_format = settings["number_format"] if scheme.is_float and settings["act_bits"] == 4 else "int"
        act_scheme = activation_scheme(settings["act_bits"], settings["act_format"] or default_format,
                                       settings["act_group_size"])
    elif settings["act_format"] is not None or settings["act_group_size"] is not None:
        raise OptionError("--act-format and --act-group-size need --act-bits")
    budget = {name.removeprefix("transform_"): settings[name] for name in TRANSFORM_OPTIONS[1:]}
    transform = None
    if settings["transform"] is not None:
        transform = make_transform(settings["transform"], settings["transform_budget"], **budget)
    elif settings["transform_budget"] != "cpu" or any(v is not None for v in budget.values()):
        raise OptionError("--transform-budget and the --transform-* training options need --transform")
    return dict(
        method=settings["method"],
        scheme=scheme,
        calibration=CalibrationSpec(settings["calib"], settings["nsamples"], settings["seqlen"], settings["data_dir"]),
        seed=settings["seed"],
        true_sequential=settings["true_sequential"],
        layout=settings["layout"],
        dtype=settings["dtype"],
        act_scheme=act_scheme,
        transform=transform,
        allocation=allocation,
        **options,
    )


def pinned_settings(settings: dict[str, object], arguments: dict[str, object]) -> dict[str, object]:
    """``settings`` with the defaults this run takes written in (the quantizer's options, the scheme's width,
    group size and symmetry, the calibration windows, the allocation's choices, score, unit and search, a trained transform's budget),
    so that a saved recipe repeats the run even if those defaults change."""
    from quantkit.allocation.options import AllocationOptions
    from quantkit.quantizers import make_quantizer

    scheme, allocation, transform = arguments["scheme"], arguments["allocation"], arguments["transform"]
    calibration = arguments["calibration"]
    pinned = dict(settings, group_size=scheme.group_size, sym=scheme.symmetric, nsamples=calibration.nsamples,
                  seqlen=calibration.seqlen)
    if allocation is None:
        pinned["bits"] = scheme.bits
    quantizer = make_quantizer(settings["method"], **{name: settings[name] for name in QUANTIZER_OPTIONS})
    for name in QUANTIZER_OPTIONS:
        if getattr(quantizer, name, None) is not None:
            pinned[name] = getattr(quantizer, name)
    if isinstance(allocation, AllocationOptions):
        pinned |= {"bits": allocation.target_bits, "bit_choices": list(allocation.bit_choices),
                   "score": allocation.chosen_score, "granularity": allocation.granularity,
                   "search_generations": allocation.search.generations,
                   "search_offspring": allocation.search.offspring}
    budget = getattr(transform, "budget", None)
    if budget is not None:
        pinned |= {f"transform_{key}": getattr(budget, key) for key in ("nsamples", "seqlen", "epochs", "batch_size")}
    return pinned
