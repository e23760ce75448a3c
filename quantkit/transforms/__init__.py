"""Function-preserving model rewrites run before quantization: Hadamard (QuaRot), FlatQuant, OSTQuant, and the
per-channel scalings AWQ, SmoothQuant and MergeQuant-style merged static activation steps; ``a+b`` applies two in
order (:mod:`quantkit.transforms.compose`)."""

from __future__ import annotations

from dataclasses import replace

from quantkit.errors import QuantkitError
from quantkit.transforms import awq, flatquant, mergequant, ostquant, smoothquant
from quantkit.transforms.awq import AWQTransform
from quantkit.transforms.base import AppliedTransform, Transform, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.compose import SEPARATOR, ComposedTransform
from quantkit.transforms.flatquant import FlatQuantTransform
from quantkit.transforms.hadamard import HadamardTransform
from quantkit.transforms.mergequant import MergeQuantTransform
from quantkit.transforms.ostquant import OSTQuantTransform
from quantkit.transforms.smoothquant import SmoothQuantTransform

TRANSFORMS: dict[str, type[Transform]] = {
    "hadamard": HadamardTransform,
    "flatquant": FlatQuantTransform,
    "ostquant": OSTQuantTransform,
    "awq": AWQTransform,
    "smoothquant": SmoothQuantTransform,
    "mergequant": MergeQuantTransform,
}
# Calibration budgets of the transforms that read calibration windows: sized for minutes on a CPU, or the paper's.
BUDGETS = {
    "flatquant": {"cpu": flatquant.CPU_BUDGET, "paper": flatquant.PAPER_BUDGET},
    "ostquant": {"cpu": ostquant.CPU_BUDGET, "paper": ostquant.PAPER_BUDGET},
    "awq": {"cpu": awq.CPU_BUDGET, "paper": awq.PAPER_BUDGET},
    "smoothquant": {"cpu": smoothquant.BUDGET, "paper": smoothquant.BUDGET},
    "mergequant": {"cpu": mergequant.BUDGET, "paper": awq.PAPER_BUDGET},
}
ONE_PASS = ("awq", "smoothquant", "mergequant")  # they read the windows once: no epochs
SMOOTHQUANT = "smoothquant"  # the one transform --transform-alpha belongs to


def make_transform(name: str, budget: str = "cpu", alpha: float | None = None, **overrides: int | None) -> Transform:
    """The transform called ``name`` (or the steps ``a+b`` name, in order); trained ones take a ``budget`` preset
    whose fields (``nsamples``, ``seqlen``, ``epochs``, ``batch_size``) ``overrides`` may replace; ``alpha`` is
    SmoothQuant's migration strength."""
    if SEPARATOR in name:
        names = name.split(SEPARATOR)
        for step in names:
            if step not in TRANSFORMS:
                raise QuantkitError(f"unknown transform {step!r} in {name!r}; choose among {', '.join(TRANSFORMS)}")
        if not any(step in BUDGETS for step in names) and (budget != "cpu" or any(v is not None for v in overrides.values())):
            raise QuantkitError(f"transform {name} reads no calibration windows: it takes no training budget")
        if alpha is not None and SMOOTHQUANT not in names:
            raise QuantkitError(f"--transform-alpha is SmoothQuant's migration strength; transform {name} has no "
                                f"{SMOOTHQUANT} step")
        return ComposedTransform(tuple(make_transform(step, budget, alpha, **overrides) if step in BUDGETS
                                       else make_transform(step) for step in names))
    if alpha is not None and name != SMOOTHQUANT:
        raise QuantkitError(f"--transform-alpha is SmoothQuant's migration strength, not an option of {name}")
    if name not in TRANSFORMS:
        raise QuantkitError(f"unknown transform {name!r}; choose one of {', '.join(TRANSFORMS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if name not in BUDGETS:
        if overrides or budget != "cpu":
            raise QuantkitError(f"transform {name} is not trained: it takes no training budget")
        return TRANSFORMS[name]()
    if budget not in BUDGETS[name]:
        raise QuantkitError(f"unknown training budget {budget!r}; choose cpu or paper")
    unknown = sorted(set(overrides) - set(TrainingBudget.__dataclass_fields__))
    if unknown:
        raise QuantkitError(f"unknown training budget field {unknown[0]!r}")
    if name in ONE_PASS and "epochs" in overrides:
        raise QuantkitError(f"transform {name} reads its calibration windows once: it takes no epochs")
    made = TRANSFORMS[name](budget=replace(BUDGETS[name][budget], **overrides))
    return made if alpha is None else replace(made, alpha=alpha)


__all__ = ["BUDGETS", "SEPARATOR", "TRANSFORMS", "AppliedTransform", "Transform", "TransformContext", "make_transform"]
