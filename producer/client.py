"""Submit chat jobs and fetch their typed results. Imports no torch: safe in any backend."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import redis
from celery import states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult

from producer.celery_app import create_celery
from producer.errors import JobFailed, JobNotFound
from producer.schemas import (
    ChatMessage,
    ChatRequest,
    ChatResult,
    GenerationParams,
    JobError,
    Progress,
    StreamEvent,
)
from producer.settings import CANCEL_CHANNEL, TASK_NAME, ProducerSettings, cancel_key, stream_key


class ChatQueueClient:
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        self.app = create_celery(self.settings, name="chatqueue-producer")
        self._redis = redis.Redis.from_url(self.settings.broker_connection_url())

    def submit(self, request: ChatRequest) -> str:
        """Queue a validated request; returns its job id (the client's own when it set one)."""
        job_id = request.job_id or uuid.uuid4().hex
        self.app.send_task(
            TASK_NAME,
            kwargs={"request": request.model_dump(mode="json"), "submitted_at": time.time()},
            task_id=job_id,
            queue=self.queue_for(request),
        )
        return job_id

    def queue_for(self, request: ChatRequest) -> str:
        """Jobs go to the queue of the model they name: only workers serving it consume it."""
        return self.settings.queue_for(request.model or self.settings.default_model)

    def submit_chat(self, messages: list[dict[str, str]], **params: Any) -> str:
        """Shorthand: messages as plain dicts, generation parameters as keywords."""
        request = ChatRequest(
            messages=[ChatMessage(**message) for message in messages],
            params=GenerationParams(**params),
        )
        return self.submit(request)

    def cancel(self, job_id: str) -> None:
        """Stop a job: a queued one never starts; a running one ends within one decode step
        with finish_reason "cancelled" and what it generated so far."""
        with self._redis.pipeline() as pipe:
            pipe.set(cancel_key(job_id), 1, ex=self.settings.result_ttl_s)
            pipe.publish(CANCEL_CHANNEL, job_id)
            pipe.execute()

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[StreamEvent]:
        """The job's events from its first one, live, until its end event.

        A "start" event means the job (re)started from scratch -- after a worker crash it runs
        again -- so a consumer that concatenates text resets on it. Raises TimeoutError when
        nothing arrives for `timeout` seconds.
        """
        last_id, wait_s = "0-0", timeout or self.settings.wait_timeout_s
        quiet_since = time.monotonic()
        while True:
            reply = self._redis.xread({stream_key(job_id): last_id}, block=1000, count=500)
            if not reply:
                if time.monotonic() - quiet_since > wait_s:
                    raise TimeoutError(f"no stream events for job {job_id} in {wait_s}s")
                continue
            quiet_since = time.monotonic()
            for entry_id, fields in reply[0][1]:
                last_id = entry_id
                event = StreamEvent.model_validate(
                    {key.decode(): value.decode() for key, value in fields.items()})
                yield event
                if event.type == "end":
                    return

    def progress(self, job_id: str) -> Progress | None:
        """Tokens so far and phase while the job runs; None before it starts or once it ended."""
        handle = AsyncResult(job_id, app=self.app)
        if handle.state != "PROGRESS" or not isinstance(handle.info, dict):
            return None
        return Progress.model_validate(handle.info)

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
        self._redis.close()
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
