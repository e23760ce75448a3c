"""Ctrl-C held back over a stretch that must not be cut, and raised as soon as it ends."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Run the block with Ctrl-C (SIGINT) recorded instead of raised, then act on it as usual. Needed around
    ``gc.collect()`` (a KeyboardInterrupt raised inside a finalizer it runs is printed as a traceback and lost)
    and around the renames that put an output in place."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(signal.SIGINT, None)
