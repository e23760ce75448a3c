"""Turning resolved settings (a recipe merged with flags) into a run plan (:func:`quantkit.runplan.plan_run`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from quantkit import defaults
from quantkit.errors import OptionError
from quantkit.recipes.fields import ALLOCATION_OPTIONS, BY_PARAM, QUANTIZER_OPTIONS, TRANSFORM_BUDGET_OPTIONS
from quantkit.schemes import FLOAT_FORMATS, FP8_FORMAT, SUPPORTED_BITS

if TYPE_CHECKING:
    from quantkit.allocation.options import AllocationOptions
    from quantkit.allocation.plan import AllocationPlan
    from quantkit.runplan import RunPlan

def allocation_options(bits: float, settings: dict[str, object], strategy: str) -> AllocationOptions:
    """The mixed-bits allocation named by ``settings`` under a target of ``bits``."""
    from quantkit.allocation.options import CPU_SEARCH, AllocationOptions

    choices = tuple(settings["bit_choices"] or defaults.BIT_CHOICES)
    search = replace(CPU_SEARCH, **{key: settings[f"search_{key}"] for key in ("generations", "offspring")
                                    if settings[f"search_{key}"] is not None})
    granularity = settings["granularity"] or ("linear" if settings["layout"] == "native" else "group")
    return AllocationOptions(bits, choices, strategy, settings["score"], granularity, search, seed=settings["seed"])


def _allocation(settings: dict[str, object]) -> tuple[AllocationOptions | AllocationPlan | None, int | None]:
    """The allocation (none, options, or a plan file) and, without one, the width of the scheme (None: the number
    format's usual width)."""
    from quantkit.allocation.plan import AllocationPlan

    allocation, bits = settings["allocation"], settings["bits"]
    given = [BY_PARAM[param].flag for param in ALLOCATION_OPTIONS if settings[param] is not None]
    if allocation is not None and Path(str(allocation)).suffix == ".json":
        if given or bits is not None:
            raise OptionError(f"{(given or ['--bits'])[0]} cannot change a saved allocation plan; "
                                "make a new one with `quantkit allocate`")
        return AllocationPlan.load(Path(str(allocation))), None
    if allocation is not None:
        return allocation_options(defaults.BITS if bits is None else bits, settings, str(allocation)), None
    if given:
        raise OptionError(f"{given[0]} needs --allocation")
    if bits is None:
        return None, None
    if bits not in SUPPORTED_BITS:
        raise OptionError(f"--bits {bits:g} is not allowed; allowed: {', '.join(map(str, SUPPORTED_BITS))} "
                          "(an average such as 3.5 needs --allocation)")
    return None, int(bits)


def run_plan(settings: dict[str, object]) -> RunPlan:
    """The run ``settings`` describe."""
    from quantkit.actquant import StaticActivations, activation_scheme
    from quantkit.kvcache import KVCacheQuantization
    from quantkit.runplan import CalibrationSpec, plan_run
    from quantkit.transforms import make_transform

    allocation, bits = _allocation(settings)
    act_scheme, act_static = None, None
    if settings["act_bits"] is not None:
        weight_format = settings["number_format"]
        same = (weight_format in FLOAT_FORMATS and settings["act_bits"] == 4) or (
            weight_format == FP8_FORMAT and settings["act_bits"] == 8)
        act_scheme = activation_scheme(settings["act_bits"], settings["act_format"] or (weight_format if same else "int"),
                                       settings["act_group_size"])
    elif settings["act_format"] is not None or settings["act_group_size"] is not None or settings["act_static"]:
        raise OptionError("--act-format, --act-group-size and --act-static need --act-bits")
    static_options = {"granularity": settings["act_granularity"], "observer": settings["act_observer"],
                      "percentile": settings["act_percentile"]}
    kv_cache = None
    if settings["kv_format"] is not None:
        kv_cache = KVCacheQuantization(settings["kv_format"], settings["kv_granularity"] or "tensor")
    elif settings["kv_granularity"] is not None:
        raise OptionError("--kv-granularity needs --kv-format")
    if settings["act_static"]:
        act_static = StaticActivations(**{k: v for k, v in static_options.items() if v is not None})
    elif any(v is not None for v in static_options.values()):
        raise OptionError("--act-granularity, --act-observer and --act-percentile need --act-static")
    budget = {name.removeprefix("transform_"): settings[name] for name in TRANSFORM_BUDGET_OPTIONS}
    transform = None
    if settings["transform"] is not None:
        transform = make_transform(settings["transform"], settings["transform_budget"], settings["transform_alpha"],
                                   **budget)
    elif settings["transform_budget"] != "cpu" or any(v is not None for v in (*budget.values(),
                                                                              settings["transform_alpha"])):
        raise OptionError("--transform-budget, --transform-alpha and the --transform-* training options need "
                          "--transform")
    return plan_run(
        settings["method"],
        bits=bits,
        group_size=settings["group_size"],
        block_rows=settings["block_rows"],
        symmetric=settings["sym"],
        number_format=settings["number_format"],
        calibration=CalibrationSpec(settings["calib"], settings["nsamples"], settings["seqlen"], settings["data_dir"],
                                    settings["expert_min_tokens"]),
        seed=settings["seed"],
        true_sequential=settings["true_sequential"],
        forward_dtype=settings["forward_dtype"],
        layout=settings["layout"],
        dtype=settings["dtype"],
        act_scheme=act_scheme,
        act_static=act_static,
        kv_cache=kv_cache,
        quantize_head=settings["quantize_head"],
        transform=transform,
        allocation=allocation,
        **{name: settings[name] for name in QUANTIZER_OPTIONS},
    )


def pinned_settings(settings: dict[str, object], run: RunPlan) -> dict[str, object]:
    """``settings`` with the defaults this run takes written in (the quantizer's options, the scheme's width,
    group size and symmetry, the calibration windows, the allocation's choices, score, unit and search, a trained transform's budget),
    so that a saved recipe repeats the run even if those defaults change."""
    from quantkit.allocation.options import AllocationOptions

    scheme, allocation, transform, calibration = run.scheme, run.allocation, run.transform, run.calibration
    pinned = dict(settings, group_size=scheme.group_size, block_rows=scheme.block_rows, sym=scheme.symmetric, nsamples=calibration.nsamples,
                  seqlen=calibration.seqlen)
    if allocation is None:
        pinned["bits"] = scheme.bits
    for name in QUANTIZER_OPTIONS:
        if getattr(run.quantizer, name, None) is not None:
            pinned[name] = getattr(run.quantizer, name)
    if isinstance(allocation, AllocationOptions):
        pinned |= {"bits": allocation.target_bits, "bit_choices": list(allocation.bit_choices),
                   "score": allocation.chosen_score, "granularity": allocation.granularity,
                   "search_generations": allocation.search.generations,
                   "search_offspring": allocation.search.offspring}
    budget = getattr(transform, "budget", None)
    if budget is not None:
        pinned |= {f"transform_{key}": getattr(budget, key) for key in ("nsamples", "seqlen", "epochs", "batch_size")}
    return pinned
