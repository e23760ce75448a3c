"""Pieces shared by the trained transforms: input maps on linears, the optimizer schedule, smoothing scales."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.hooks import RemovableHandle

from quantkit.errors import QuantkitError

InputMap = Callable[[torch.Tensor], torch.Tensor]


def require_float32(model: nn.Module, name: str) -> None:
    """Trained transforms keep their parameters in float32 and train on a float32 model."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise QuantkitError(f"{name} trains on a float32 model; this one is {dtype} (load it in float32)")


def epoch_means(losses: list[float], steps_per_epoch: int) -> tuple[float, float]:
    """Mean loss of the first and of the last epoch."""
    first, last = losses[:steps_per_epoch], losses[-steps_per_epoch:]
    return sum(first) / len(first), sum(last) / len(last)


def map_inputs(module: nn.Module, maps: dict[str, InputMap]) -> list[RemovableHandle]:
    """Replace the input ``x`` of each named submodule by ``maps[name](x)`` from now on."""

    def hook_for(fn: InputMap):
        def hook(_module: nn.Module, args: tuple) -> tuple:
            return (fn(args[0]), *args[1:])

        return hook

    return [module.get_submodule(name).register_forward_pre_hook(hook_for(fn)) for name, fn in maps.items()]


def smooth_init(weight_amax: torch.Tensor, act_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant-style per-channel scale ``max|W|^(1-α) / max|X|^α`` (the activation is multiplied by it)."""
    return (weight_amax.clamp_min(1e-5).pow(1 - alpha) / act_amax.clamp_min(1e-5).pow(alpha)).clamp_min(1e-5)


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int, floor: float = 1e-3) -> LambdaLR:
    """Each group's lr follows a cosine from its initial value to ``floor`` times it over ``steps``."""

    def factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))

    return LambdaLR(optimizer, factor)
