"""The worker's result backend: Celery's Redis backend, except that a job's final state
(SUCCESS or FAILURE) is written once -- no later write replaces it, so a second run of a job
(its worker died after storing the result but before the ack, Redis went away in between, or
the producer's publish was retried) can never replace the first one's result -- and a batch
line's end is counted in its batch in the same transaction.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from celery.loaders.app import AppLoader

from producer.batches import batch_key, batch_of_job, line_outcome, mark_finished_if_done

log = logging.getLogger(__name__)


class WriteOnceRedisBackend(RedisBackend):
    """Celery's Redis result backend, except that a job's final state is written once.

    Celery itself only refuses to overwrite a SUCCESS, and not atomically; a FAILURE (our
    structured errors) it lets a second run replace, STARTED and PROGRESS included. Here the
    check and the write are one Redis transaction (WATCH), so two runs finishing together still
    store one result.
    """

    def _set_with_state(self, key: bytes | str, value: Any, state: str) -> Any:
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend")
        expires = self.failure_expires if state == states.FAILURE else self.expires
        stored = self.ensure(self._set_unless_final, (key, value, expires))
        if not stored and state in states.READY_STATES:
            log.warning("job %s already has a final result: this run's %s is not stored",
                        self._job_id(key), state)
        return stored

    def _set_unless_final(self, key: bytes | str, value: Any, expires: int | None) -> bool:
        batch_id = batch_of_job(self._job_id(key))

        def write(pipe: Any) -> bool:
            current = pipe.get(key)
            if current is not None and self._is_final(current):
                return False
            # A batch line's final result counts in its batch in the same transaction: exact
            # counts whatever crashes or redeliveries happen (and only the first result counts).
            outcome = self._batch_outcome(value) if batch_id is not None and \
                pipe.exists(batch_key(batch_id)) else None
            pipe.multi()
            pipe.set(key, value, ex=expires or None)
            pipe.publish(key, value)  # what result waiters subscribe to, as in RedisBackend
            if outcome is not None and batch_id is not None:
                pipe.hincrby(batch_key(batch_id), outcome, 1)
            return True

        stored = bool(self.client.transaction(write, key, value_from_callable=True))
        if stored and batch_id is not None:
            mark_finished_if_done(self.client, batch_id)
        return stored

    def _batch_outcome(self, value: Any) -> str | None:
        """completed / failed for a final state, None for STARTED or PROGRESS."""
        try:
            meta = self.decode(value)
        except Exception:
            return None
        if meta.get("status") not in states.READY_STATES:
            return None
        return line_outcome(meta["status"], meta.get("result"))

    def _is_final(self, stored: bytes) -> bool:
        try:
            return self.decode(stored).get("status") in states.READY_STATES
        except Exception:  # not ours to judge: let the new write replace it
            return False

    def _job_id(self, key: bytes | str) -> str:
        text = key.decode() if isinstance(key, bytes) else key
        prefix = self.task_keyprefix.decode() if isinstance(self.task_keyprefix, bytes) \
            else self.task_keyprefix
        return text.removeprefix(prefix)


class WriteOnceSentinelBackend(WriteOnceRedisBackend, SentinelBackend):
    """The write-once result backend on the primary Redis Sentinel names (sentinel:// URLs)."""


class WorkerLoader(AppLoader):
    """Celery's default loader, with the write-once backend for redis://, rediss:// and
    sentinel:// URLs."""

    override_backends: ClassVar[dict[str, str]] = {
        "redis": f"{__name__}:WriteOnceRedisBackend",
        "rediss": f"{__name__}:WriteOnceRedisBackend",
        "sentinel": f"{__name__}:WriteOnceSentinelBackend",
    }
