"""Stopping a worker without losing a job: finish what can finish, put the rest back.

On SIGTERM Celery stops taking jobs and waits for the running ones (warm shutdown), however
long they take. `Drain` bounds that wait: after the grace period it interrupts the jobs still
running -- the engine thread fails each one's future with `JobInterrupted` before its next
step (the job did not end: no finish reason says so), which the task turns into a requeue of
the message -- and the job runs again, from its start, on another worker. An engine that does
not get to it within `engine_response_s` (a step that never returns: a hung device) does not
hold the jobs hostage: their futures are then failed from here, and their slots requeue them
all the same.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from worker.engine import EngineJob
from worker.errors import JobInterrupted

log = logging.getLogger(__name__)


# Longer than any engine step should take; past it the engine is taken to be stuck.
ENGINE_RESPONSE_S = 30.0


class Drain:
    def __init__(self, engine_response_s: float = ENGINE_RESPONSE_S) -> None:
        self.engine_response_s = engine_response_s
        self._lock = threading.Lock()
        self._running: set[EngineJob] = set()
        self._timer: threading.Timer | None = None
        self.abandoning = False  # past the grace period: running jobs are being handed back
        self.stopping = threading.Event()  # the engine is stopping or stopped

    def begin(self, grace_s: float) -> None:
        """The worker was asked to stop: let running jobs go on for `grace_s` seconds."""
        with self._lock:
            if self._timer is not None:
                return
            self._timer = threading.Timer(grace_s, self.abandon)
            self._timer.daemon = True
            self._timer.name = "chatqueue-drain"
        log.info("stopping: %d running job(s) get %.0f s to finish, then go back to the queue",
                 len(self._running), grace_s)
        self._timer.start()

    def abandon(self) -> None:
        """Interrupt every running job (the engine ends it between steps and frees its row);
        each one's task slot then hands it back to the queue. A job that finished first keeps
        its result. Runs on the timer's thread: it only asks, never sets an outcome."""
        with self._lock:
            self.abandoning = True
            running = list(self._running)
        if running:
            log.warning("grace period over: %d job(s) go back to the queue", len(running))
        for job in running:
            job.interrupt(JobInterrupted("this worker is stopping and its grace period is over"))
        if running:
            fallback = threading.Timer(self.engine_response_s, self._fail_unresolved, (running,))
            fallback.daemon = True
            fallback.name = "chatqueue-drain-fallback"
            fallback.start()

    def _fail_unresolved(self, jobs: list[EngineJob]) -> None:
        """The engine did not end interrupted jobs in time: fail them here (the first outcome
        stands, so a job the engine ends at the same moment keeps the engine's)."""
        stuck = [job for job in jobs if not job.future.done()]
        if stuck:
            log.error("the engine did not end %d interrupted job(s) within %.0f s: failing them "
                      "here so their slots requeue them", len(stuck), self.engine_response_s)
        for job in stuck:
            assert job.interruption is not None
            job.fail(job.interruption)

    @property
    def draining(self) -> bool:
        """Asked to stop: no new job should start here."""
        return self._timer is not None or self.stopping.is_set()

    def cancel_timer(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    @contextmanager
    def hold(self, job: EngineJob) -> Iterator[None]:
        """Track a running engine job, so that `abandon` can stop it."""
        with self._lock:
            if self.abandoning:
                job.cancel()
                raise JobInterrupted("this worker is stopping")
            self._running.add(job)
        try:
            yield
        finally:
            with self._lock:
                self._running.discard(job)
