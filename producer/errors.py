"""chatqueue's errors: one base, `ChatQueueError`, for the producer's and the worker's alike.

They live in the producer (the contract's home; the worker imports it, never the reverse).
Each class says what becomes of a job that meets it (`outcome`) and, when the job ends with an
error, its `JobError` code:

    outcome "failed"    the job ends with a JobError (`code`); never retried: the same request
                        would fail the same way (JobFailed; DeviceOutOfMemory, out_of_memory)
    outcome "requeued"  not the job's fault: it goes back to the queue and runs again from its
                        start, here or on another worker (JobInterrupted, EngineStopped)
    outcome None        no job's end: a caller's error (JobNotFound, JobIdConflict,
                        NotReplicated) or a worker that cannot start (ModelNotReady,
                        WorkerMisconfigured, DownloadError)

An error of any other class while a job runs ends it with `internal_error`. The worker's one
mapping from these to what Celery is told is `worker.outcome.settle`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from producer.schemas import JobError

Outcome = Literal["failed", "requeued"]


class ChatQueueError(Exception):
    """The base of every chatqueue error."""

    outcome: ClassVar[Outcome | None] = None
    code: ClassVar[str | None] = None  # the JobError code when outcome is "failed"

    def job_error(self) -> JobError:
        """The structured error a job that ends with this error gets."""
        return JobError(code=self.code or "internal_error", message=str(self))


class JobFailed(ChatQueueError):
    """The job ended with a structured error instead of a result.

    Celery stores a task's exception as its type name, module and args in JSON and rebuilds it
    on the producer side, so the error travels as one plain dict argument.
    """

    def __init__(self, error: JobError | dict[str, Any]) -> None:
        payload = error.model_dump() if isinstance(error, JobError) else dict(error)
        super().__init__(payload)

    outcome = "failed"

    @property
    def error(self) -> JobError:
        return JobError.model_validate(self.args[0])

    def job_error(self) -> JobError:
        return self.error

    def __str__(self) -> str:
        return f"{self.args[0].get('code')}: {self.args[0].get('message')}"


class JobNotFound(ChatQueueError, LookupError):
    """No such job: never submitted, or its result expired (see result_ttl_s)."""


class JobIdConflict(ChatQueueError, ValueError):
    """A job id already names a different request (queued, running, or finished within
    result_ttl_s). The first request stands; submit the new one under a new job id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(
            f"job_id {job_id!r} is already in use by a different request (queued, running, or "
            "finished within result_ttl_s): the first request stands and nothing was queued; "
            "submit this one under a new job_id"
        )


class NotReplicated(ChatQueueError, ConnectionError):
    """submit() with submit_min_replicas: the job did not reach that many replicas in time
    (replicas down, or a failover under way). It is not accepted; submitting the same request
    again under the same job id is safe."""

    def __init__(self, job_id: str, reason: str) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id}: not confirmed on the replicas asked for ({reason})")
