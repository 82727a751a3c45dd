"""How a job ends when it ends without a result, in one place.

`settle` is the one mapping from an error to what Celery is told, read from the error's class
(producer/errors.py: each says its outcome and JobError code): JobFailed, a stored failure
that is never retried; JobInterrupted, a requeue (the job runs again from its start); anything
else, an internal error. `job_failed` counts and logs that end, once, whichever step raised.
"""

from __future__ import annotations

import logging

import redis

from producer.errors import ChatQueueError, JobFailed
from worker.errors import JobInterrupted
from worker.metrics import WorkerMetrics
from worker.redact import describe_failure

log = logging.getLogger(__name__)


def settle(exc: BaseException) -> JobFailed | JobInterrupted | None:
    """What a job that raised `exc` ends as; None for an internal error (a bug: Celery stores
    it as it is, and a client reads it as internal_error)."""
    if isinstance(exc, JobFailed | JobInterrupted):
        return exc
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return JobInterrupted(f"Redis unreachable: {exc}")
    if isinstance(exc, ChatQueueError):
        if exc.outcome == "requeued":
            return JobInterrupted(str(exc))
        if exc.outcome == "failed":
            return JobFailed(exc.job_error())
    return None


def job_failed(metrics: WorkerMetrics, job_id: str, exc: BaseException) -> BaseException:
    """Count and log a job that raised `exc`; returns the error to raise to Celery."""
    settled = settle(exc)
    if isinstance(settled, JobInterrupted):
        log.warning("job %s goes back to the queue: %s", job_id, settled)
        return settled
    if isinstance(settled, JobFailed):
        metrics.job_failed(settled.error.code)
        log.info("job %s failed: %s", job_id, describe_failure(settled))
        return settled
    metrics.job_failed("internal_error")
    log.error("job %s failed with an internal error", job_id, exc_info=exc)
    return exc
