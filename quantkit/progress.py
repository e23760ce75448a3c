"""Consoles and progress: rich bars with elapsed time and ETA on a terminal; elsewhere (CI, logs, nohup) one
line per finished phase with its time, and a line at most once a minute while a counted phase runs."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PIPED_WIDTH = 240  # columns of a console that is not a terminal: tables keep their numbers whole
HEARTBEAT_SECONDS = 60.0  # how often a running phase reports itself when not on a terminal


def make_console(stderr: bool = False) -> Console:
    """A rich console; when it is not a terminal, wide enough that tables are not squeezed to 80 columns."""
    console = Console(stderr=stderr)
    return console if console.is_terminal else Console(stderr=stderr, width=PIPED_WIDTH)


stderr_console = make_console(stderr=True)
# Progress is shown by the first rank of a data-parallel run alone (torchrun sets RANK); the others stay quiet.
progress_console = stderr_console if os.environ.get("RANK", "0") == "0" else Console(stderr=True, quiet=True)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    started: float
    reported: float
    resumed_at: float  # steps already complete when the task began (a resumed run): not part of the rate
    done: bool = False


class LineProgress:
    """The part of :class:`rich.progress.Progress` that quantkit uses, printed as plain lines: a task's line
    when it completes (or when the phase ends), and while it runs one at the first step after each minute."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.tasks: list[_Task] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        if exc_info[0] is None:
            for task in self.tasks:
                self._finish(task)

    def add_task(self, description: str, total: float | None = None, completed: float = 0) -> int:
        now = time.perf_counter()
        self.tasks.append(_Task(description, total, completed, now, now, completed))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               description: str | None = None) -> None:
        task = self.tasks[task_id]
        task.completed = completed if completed is not None else task.completed + (advance or 0)
        task.description = description or task.description
        if task.total is not None and task.completed >= task.total:
            self._finish(task)
        elif time.perf_counter() - task.reported >= HEARTBEAT_SECONDS:
            task.reported = time.perf_counter()
            self.console.print(f"{task.description}: {self._count(task)}, {self._elapsed(task)} so far"
                               f"{self._eta(task)}", markup=False, highlight=False)

    def _finish(self, task: _Task) -> None:
        if not task.done:
            task.done = True
            self.console.print(f"{task.description}: {self._count(task)} in {self._elapsed(task)}",
                               markup=False, highlight=False)

    @staticmethod
    def _count(task: _Task) -> str:
        done = f"{task.completed:g}" if task.completed == int(task.completed) else f"{task.completed:.1f}"
        return done if task.total is None else f"{done}/{task.total:g}"

    @staticmethod
    def _elapsed(task: _Task) -> str:
        return f"{time.perf_counter() - task.started:.1f} s"

    @staticmethod
    def _eta(task: _Task) -> str:
        if not task.total or task.completed <= task.resumed_at:
            return ""
        rate = (task.completed - task.resumed_at) / (time.perf_counter() - task.started)
        return f", eta {(task.total - task.completed) / rate:.0f} s"


def warn(line: str) -> None:
    """One warning line on stderr (a run goes on)."""
    stderr_console.print(f"[yellow]warning:[/yellow] {line}", highlight=False, soft_wrap=True)


def progress_bar(transient: bool = False) -> Progress | LineProgress:
    """A progress display on stderr: a rich bar on a terminal, plain lines elsewhere."""
    if not progress_console.is_terminal:
        return LineProgress(progress_console)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=progress_console,
        transient=transient,
    )


@contextmanager
def phase(description: str, seconds: dict[str, float] | None = None, key: str = "") -> Iterator[None]:
    """Time a phase of unknown length (into ``seconds[key]`` when given): a spinner on a terminal, one line
    when it ends elsewhere."""
    start = time.perf_counter()
    if progress_console.is_terminal:
        spinner = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                           console=progress_console, transient=True)
        with spinner:
            spinner.add_task(description, total=None)
            yield
    else:
        yield
        progress_console.print(f"{description}: done in {time.perf_counter() - start:.1f} s", markup=False,
                             highlight=False)
    if seconds is not None:
        seconds[key] = time.perf_counter() - start
