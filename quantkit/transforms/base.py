"""The transform interface: learn (or build) a :class:`~quantkit.transforms.rewrite.Rewrite`, then fuse it.

A transform runs on the full-precision model before any quantizer. It first prepares the model (untied
embeddings, folded norms), decides its rewrite, and fuses it (then clamps weights to ranges it searched,
AWQ's clipping); what stays at run time is returned: the online input maps of some linears, and learned
clipping ratios for weights (per output row) and activations (per layer) that the quantizer and the
activation quantizer apply.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch
from torch import nn

from quantkit.formats.kron import Kron
from quantkit.models.adapters import ModelAdapter
from quantkit.schemes import QuantScheme
from quantkit.transforms.prepare import prepare
from quantkit.transforms.rewrite import Rewrite, clamp_ranges, fuse

CalibrationLoader = Callable[[int, int], torch.Tensor]  # (windows, tokens per window) -> token ids


@dataclass
class TransformContext:
    """What a transform may use: the model, where things are, the schemes it prepares for, calibration text."""

    model: nn.Module
    adapter: ModelAdapter
    weight_scheme: QuantScheme
    act_scheme: QuantScheme | None
    calibration: CalibrationLoader
    seed: int = 0
    online: frozenset[str] = frozenset()  # linears (full names) an earlier transform gave an online input map


@dataclass
class Learned:
    """A transform's decision: the rewrite, the clipping ratios it learned and the weight ranges it searched (by
    full layer name)."""

    rewrite: Rewrite
    weight_clip: dict[str, torch.Tensor] = field(default_factory=dict)
    # the largest |w| each group of columns keeps once the rewrite is fused: [rows, groups] of the weight scheme
    weight_range: dict[str, torch.Tensor] = field(default_factory=dict)
    act_clip: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)


@dataclass
class AppliedTransform:
    """What remains of a fused transform at run time, and its record for the checkpoint."""

    online: dict[str, Kron]
    weight_clip: dict[str, torch.Tensor]
    act_clip: dict[str, float]
    record: dict

    def has_online(self) -> bool:
        return bool(self.online)


class Transform(ABC):
    """A function-preserving model rewrite that makes weights and activations easier to quantize."""

    name: ClassVar[str]

    def has_online(self) -> bool:
        """Whether it leaves online input maps (which only the native checkpoint layout stores)."""
        return True

    def options(self) -> dict:
        """The settings that reproduce it (recorded in checkpoints)."""
        return asdict(self)  # type: ignore[call-overload]

    def check(self, act_scheme: QuantScheme | None) -> None:  # noqa: B027 (an optional hook)
        """Refuse, before any work, activations it cannot prepare for (one-line error); any, by default."""

    @abstractmethod
    def apply(self, ctx: TransformContext) -> AppliedTransform:
        """Rewrite the model in ``ctx`` in place; what stays at run time."""


class RewriteTransform(Transform):
    """A transform that decides one :class:`Rewrite` of the prepared model and fuses it."""

    @abstractmethod
    def learn(self, ctx: TransformContext) -> Learned:
        """Decide the rewrite of the prepared model in ``ctx`` (which it must leave unchanged)."""

    def prepare(self, ctx: TransformContext) -> None:
        """Make the model what :meth:`learn` expects: untied embeddings and every norm folded, by default."""
        prepare(ctx.model, ctx.adapter)

    def apply(self, ctx: TransformContext) -> AppliedTransform:
        """Prepare the model, learn the rewrite, fuse it, clamp the searched ranges; the run-time remainder."""
        ctx.adapter.transform_sites()  # refuses an architecture transforms do not apply to
        self.prepare(ctx)
        learned = self.learn(ctx)
        online = fuse(ctx.model, ctx.adapter, learned.rewrite)
        clamp_ranges(ctx.model, learned.weight_range, ctx.weight_scheme)
        record = {"name": self.name, "options": self.options(), **({"training": learned.stats} if learned.stats else {})}
        return AppliedTransform(online, learned.weight_clip, learned.act_clip, record)
