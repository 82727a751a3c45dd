"""A job's stream events on their way to Redis, surviving a Redis restart.

The stream is a live view; the stored result is the record. So a stream write that fails never
fails the job: the events wait here, in order, and go out once Redis is back.
"""

from __future__ import annotations

import logging
import time

import redis

from producer.schemas import StreamEvent
from worker.control import JobControl
from worker.lease import Lease

log = logging.getLogger(__name__)


class StreamRelay:
    def __init__(self, control: JobControl | None, job_id: str,
                 lease: Lease | None = None) -> None:
        self.control = control
        self.job_id = job_id
        self.lease = lease  # writes are fenced by it: another run's lease stops them
        self._pending: list[StreamEvent] = []
        # The first write also clears what an earlier run of this job streamed (a redelivery).
        self._restart = True
        self._failing = False

    def send(self, events: list[StreamEvent]) -> bool:
        """Queue `events` and try to write everything queued; True once nothing is left."""
        if self.control is None:
            return True
        self._pending += events
        if not self._pending:
            return True
        if self.lease is not None and self.lease.lost.is_set():
            self._pending = []  # the stream is another run's now
            return True
        try:
            fence = {} if self.lease is None else {"lease": self.lease}
            written = self.control.publish(self.job_id, self._pending, restart=self._restart,
                                           **fence)
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("job %s: stream paused, Redis unreachable (%s); the job goes on",
                            self.job_id, exc)
                self._failing = True
            return False
        if written is False and self.lease is not None:
            self.lease.mark_lost()
            self._pending = []
            return True
        if self._failing:
            log.info("job %s: stream resumed", self.job_id)
            self._failing = False
        self._pending, self._restart = [], False
        return True

    def flush(self, timeout_s: float, interval_s: float = 0.5) -> None:
        """Try for a while to write what is left, e.g. the end event, while Redis comes back."""
        deadline = time.monotonic() + timeout_s
        while not self.send([]) and time.monotonic() < deadline:
            time.sleep(interval_s)
        if self._pending:
            log.warning("job %s: %d stream event(s) not written; the result has the full text",
                        self.job_id, len(self._pending))
