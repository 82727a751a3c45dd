"""Submit chat jobs and fetch their typed results. Imports no torch: safe in any backend."""

from __future__ import annotations

import time
import uuid
from typing import Any

from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from producer.celery_app import create_celery
from producer.errors import JobFailed, JobNotFound
from producer.schemas import ChatMessage, ChatRequest, ChatResult, GenerationParams, JobError
from producer.settings import TASK_NAME, ProducerSettings


class ChatQueueClient:
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        self.app = create_celery(self.settings, name="chatqueue-producer")

    def submit(self, request: ChatRequest) -> str:
        """Queue a validated request; returns its job id (the client's own when it set one)."""
        job_id = request.job_id or uuid.uuid4().hex
        self.app.send_task(
            TASK_NAME,
            kwargs={"request": request.model_dump(mode="json"), "submitted_at": time.time()},
            task_id=job_id,
            queue=self.settings.queue,
        )
        return job_id

    def submit_chat(self, messages: list[dict[str, str]], **params: Any) -> str:
        """Shorthand: messages as plain dicts, generation parameters as keywords."""
        request = ChatRequest(
            messages=[ChatMessage(**message) for message in messages],
            params=GenerationParams(**params),
        )
        return self.submit(request)

    def state(self, job_id: str) -> str:
        """Celery's state: PENDING (queued or unknown), STARTED, SUCCESS, FAILURE, ..."""
        return str(AsyncResult(job_id, app=self.app).state)

    def result(self, job_id: str, timeout: float | None = None) -> ChatResult:
        """Wait for a job and return its result; raises JobFailed with the structured error."""
        handle = AsyncResult(job_id, app=self.app)
        try:
            payload = handle.get(
                timeout=timeout or self.settings.wait_timeout_s, propagate=False, interval=0.05
            )
        except CeleryTimeoutError as exc:
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from exc
        if handle.state == states.SUCCESS:
            return ChatResult.model_validate(payload)
        raise _as_job_failed(job_id, payload)

    def fetch(self, job_id: str) -> ChatResult | None:
        """The result if the job has finished, None while it is queued or running."""
        handle = AsyncResult(job_id, app=self.app)
        if handle.state in states.READY_STATES:
            return self.result(job_id)
        return None

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> ChatQueueClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _as_job_failed(job_id: str, payload: object) -> JobFailed:
    if isinstance(payload, JobFailed):
        return payload
    # A failure that is not ours (a crash, a Celery error) still reaches the caller typed.
    return JobFailed(JobError(code="internal_error", message=f"job {job_id} failed: {payload!r}"))


__all__ = ["ChatQueueClient", "JobFailed", "JobNotFound"]
