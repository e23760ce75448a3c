"""Transforms applied one after another: ``hadamard+awq`` (AWQ's scales searched on the rotated model),
``smoothquant+hadamard`` (outliers smoothed into the weights, then rotated away), and so on.

Each step is fused into the model before the next one learns, with the earlier steps' online input maps
running (as they will at run time), so every step sees the function that is served. A per-channel scale
cannot be folded in front of an online map (the map would mix the channels it scales), so a scaling step
leaves alone the inputs an earlier step gave an online map (after ``hadamard``: down's input, and the
attention output's where heads are rotated across). A scaling step before a rotation keeps only the scales of
the value and down inputs (SmoothRot's smoothing before the online Hadamard): the rotation folds every norm,
the scales on q/k/v's and gate/up's inputs with them, back into the weights. At most one step rotates or learns
online maps, and at most one reads calibration windows, so the training budget options have one step to go to.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from quantkit.errors import QuantkitError
from quantkit.schemes import QuantScheme
from quantkit.transforms.base import AppliedTransform, Transform, TransformContext
from quantkit.transforms.budget import TrainingBudget
from quantkit.transforms.rewrite import attach_online
from quantkit.transforms.scaling import ScalingTransform

SEPARATOR = "+"


@dataclass
class ComposedTransform(Transform):
    """Several transforms fused in order; see the module docstring."""

    steps: tuple[Transform, ...]

    def __post_init__(self) -> None:
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names) or len(names) < 2:
            raise QuantkitError(f"transform {SEPARATOR.join(names)} must join different transforms")
        rotating = [step.name for step in self.steps if not isinstance(step, ScalingTransform)]
        if len(rotating) > 1:
            raise QuantkitError(f"transforms {' and '.join(rotating)} both rotate the model: compose at most one of "
                                "them with a scaling transform (awq, smoothquant, mergequant)")
        calibrated = [step.name for step in self.steps if getattr(step, "budget", None) is not None]
        if len(calibrated) > 1:
            raise QuantkitError(f"transforms {' and '.join(calibrated)} both read calibration windows: compose "
                                "at most one of them (with hadamard)")

    @property
    def name(self) -> str:  # type: ignore[override]
        return SEPARATOR.join(step.name for step in self.steps)

    @property
    def budget(self) -> TrainingBudget | None:
        """The budget of the step that reads calibration windows, if one does."""
        return next((step.budget for step in self.steps if getattr(step, "budget", None) is not None), None)

    def has_online(self) -> bool:
        return any(step.has_online() for step in self.steps)

    def check(self, act_scheme: QuantScheme | None) -> None:
        for step in self.steps:
            step.check(act_scheme)

    def options(self) -> dict:
        return {"steps": [{"name": step.name, "options": step.options()} for step in self.steps]}

    def apply(self, ctx: TransformContext) -> AppliedTransform:
        online, weight_clip, act_clip, records, hooks = {}, {}, {}, [], []
        try:
            for step in self.steps:
                applied = step.apply(replace(ctx, online=frozenset(online)))
                hooks += attach_online(ctx.model, applied.online)
                online |= applied.online
                weight_clip |= applied.weight_clip
                act_clip |= applied.act_clip
                records.append(applied.record)
        finally:
            for hook in hooks:
                hook.remove()
        return AppliedTransform(online, weight_clip, act_clip,
                                {"name": self.name, "options": self.options(), "steps": records})
