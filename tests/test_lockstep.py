"""Lockstep: jobs meet at rendezvous points, each action runs once, failures surface."""

from __future__ import annotations

import pytest

from quantkit.lockstep import Lockstep


def test_jobs_advance_together_and_each_action_runs_once() -> None:
    lockstep, log = Lockstep(), []

    def job(i: int):
        def run() -> int:
            log.append(("a", i, lockstep.job_index()))
            lockstep.rendezvous(lambda: log.append("first"))
            log.append(("b", i, lockstep.job_index()))
            lockstep.rendezvous(lambda: log.append("second"))
            return i * 10

        return run

    assert lockstep.run([job(i) for i in range(3)]) == [0, 10, 20]
    assert log == [("a", 0, 0), ("a", 1, 1), ("a", 2, 2), "first", ("b", 0, 0), ("b", 1, 1), ("b", 2, 2), "second"]


def test_a_failing_job_raises_in_the_caller() -> None:
    lockstep = Lockstep()

    def fails() -> None:
        raise ValueError("boom")

    def waits() -> None:
        lockstep.rendezvous(lambda: None)

    with pytest.raises(ValueError, match="boom"):
        lockstep.run([waits, fails, waits])


def test_jobs_that_diverge_are_an_error() -> None:
    lockstep = Lockstep()
    with pytest.raises(RuntimeError, match="diverged"):
        lockstep.run([lambda: lockstep.rendezvous(lambda: None), lambda: None])
