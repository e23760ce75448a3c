"""Parsing the devices a run spreads its decoder blocks over."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from quantkit.errors import QuantkitError


def resolve_devices(names: Sequence[str]) -> tuple[torch.device, ...]:
    """``names`` (e.g. ``cuda:0``, ``cuda:1``, ``cpu``) as devices this machine has; one line naming a bad one."""
    devices = []
    for name in names:
        try:
            device = torch.device(name.strip())
        except RuntimeError:
            raise QuantkitError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            index = 0 if device.index is None else device.index
            if index >= count:
                raise QuantkitError(f"device {name} is not available: this machine has {count} CUDA device(s)")
            device = torch.device("cuda", index)
        elif device.type != "cpu":
            raise QuantkitError(f"device {name!r} is not supported; use cpu, cuda or cuda:N")
        devices.append(device)
    if not devices:
        raise QuantkitError("--devices names no device")
    return tuple(devices)
