"""Run one job per calibration batch so that all jobs pause at the same points of a forward pass.

Jobs are greenlets on the calling thread: they run one at a time, in order, and share torch's thread
pool, so results are deterministic and no core sits idle. Inside a job, :meth:`Lockstep.rendezvous` pauses
until every job has reached it; the action of the rendezvous then runs once (e.g. quantize a layer from
statistics all batches contributed) and the jobs resume in order. This is what lets GPTQ's
true-sequential mode quantize a block in a single forward pass instead of one pass per group of linears.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from greenlet import getcurrent, greenlet


@dataclass
class _Pause:
    action: Callable[[], None]


class Lockstep:
    def __init__(self) -> None:
        self._index = 0
        self._parent: greenlet | None = None

    def run(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``jobs`` to completion through their rendezvous points; their results, in order."""
        self._parent = getcurrent()
        lets = [greenlet(job) for job in jobs]
        results: list[Any] = [None] * len(jobs)
        running = set(range(len(jobs)))
        while running:
            actions = []
            for i in sorted(running):
                self._index = i
                value = lets[i].switch()
                if isinstance(value, _Pause):
                    actions.append(value.action)
                else:
                    results[i] = value
                    running.discard(i)
            if actions and len(actions) != len(jobs):
                raise RuntimeError("jobs diverged: some finished while others waited at a rendezvous")
            if actions:
                actions[-1]()
        return results

    def job_index(self) -> int:
        """Index of the job now running."""
        return self._index

    def rendezvous(self, action: Callable[[], None]) -> None:
        """Pause the running job until every job arrives here; then ``action`` runs once and all go on."""
        assert self._parent is not None, "rendezvous called outside Lockstep.run"
        self._parent.switch(_Pause(action))
