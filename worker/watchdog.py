"""A worker whose engine thread died must stop taking jobs, not fail each one it takes.

The engine thread owns the model: once it is gone every job this worker takes can only fail
(or, as the engine answers, go back to the queue) in milliseconds, and a fleet's queue would
drain into that one worker while healthy ones idle. The watchdog turns the death into a warm
shutdown with a non-zero exit: the consumer stops, running jobs go back to the queue, and the
health check fails from the moment it happens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

class Watched(Protocol):
    def wait_ended(self, timeout: float | None = None) -> bool: ...

    @property
    def stop_requested(self) -> bool: ...


def watch_engine(engine: Watched, on_death: Callable[[], None]) -> threading.Thread:
    """Call `on_death` (once, from a thread of its own) if the engine thread ends without
    having been asked to stop."""

    def watch() -> None:
        engine.wait_ended()
        if not engine.stop_requested:
            on_death()

    thread = threading.Thread(target=watch, name="chatqueue-engine-watchdog", daemon=True)
    thread.start()
    return thread


def stop_consuming(exitcode: int) -> None:
    """Ask Celery for a warm shutdown, as its SIGTERM handler does: the consumer loop checks
    this flag on every turn and stops taking messages; the process then exits with `exitcode`."""
    from celery.worker import state

    state.should_stop = exitcode
