"""Exceptions a backend sees. They live in the producer so both sides can raise and catch them."""

from __future__ import annotations

from typing import Any

from producer.schemas import JobError


class JobFailed(Exception):
    """The job ended with a structured error instead of a result.

    Celery stores a task's exception as its type name, module and args in JSON and rebuilds it
    on the producer side, so the error travels as one plain dict argument.
    """

    def __init__(self, error: JobError | dict[str, Any]) -> None:
        payload = error.model_dump() if isinstance(error, JobError) else dict(error)
        super().__init__(payload)

    @property
    def error(self) -> JobError:
        return JobError.model_validate(self.args[0])

    def __str__(self) -> str:
        return f"{self.args[0].get('code')}: {self.args[0].get('message')}"


class JobNotFound(LookupError):
    """No such job: never submitted, or its result expired (see result_ttl_s)."""


class JobIdConflict(ValueError):
    """A job id already names a different request (queued, running, or finished within
    result_ttl_s). The first request stands; submit the new one under a new job id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job_id {job_id!r} is already in use by a different request (queued, running, or "
            "finished within result_ttl_s): the first request stands and nothing was queued; "
            "submit this one under a new job_id"
        )


class NotReplicated(ConnectionError):
    """submit() with submit_min_replicas: the job did not reach that many replicas in time
    (replicas down, or a failover under way). It is not accepted; submitting the same request
    again under the same job id is safe."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: not confirmed on the replicas asked for ({reason})")
