"""How much a trained transform sees: calibration windows, their length, passes over them, batch size."""

from __future__ import annotations

from dataclasses import dataclass

from quantkit.errors import QuantkitError


@dataclass(frozen=True)
class TrainingBudget:
    nsamples: int
    seqlen: int
    epochs: int
    batch_size: int

    def __post_init__(self) -> None:
        for field, value in (("nsamples", self.nsamples), ("seqlen", self.seqlen), ("epochs", self.epochs),
                             ("batch_size", self.batch_size)):
            if value < 1:
                raise QuantkitError(f"transform training {field} must be positive, got {value}")

    @property
    def batches(self) -> int:
        return -(-self.nsamples // self.batch_size)

    @property
    def steps(self) -> int:
        return self.epochs * self.batches
