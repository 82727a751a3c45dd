"""Submit chat jobs and fetch their typed results. Imports no torch: safe in any backend."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, cast

import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from pydantic import ValidationError
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from producer.celery_app import create_celery
from producer.errors import JobFailed, JobIdConflict, JobNotFound
from producer.schemas import (
    ChatRequest,
    ChatResult,
    JobError,
    Progress,
    StreamEvent,
    error_from_validation,
)
from producer.settings import (
    CANCEL_CHANNEL,
    TASK_NAME,
    ProducerSettings,
    accepted_key,
    cancel_key,
    stream_key,
)

# While Redis restarts, the stream reader waits this long between attempts to reconnect.
_RECONNECT_WAIT_S = 0.5

# KEYS: job record, cancel key; ARGV: ttl, channel, job id. 0 when no such job.
CANCEL_IF_KNOWN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


def parse_request(raw: ChatRequest | Mapping[str, Any]) -> ChatRequest:
    """A request as the contract reads it; a bad one raises JobFailed whose JobError names the
    field, the limit and the value given -- the same error a worker would store."""
    if isinstance(raw, ChatRequest):
        return raw
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise JobFailed(error_from_validation(exc)) from None


def request_digest(args: Any, kwargs: Any) -> str:
    """What makes two publishes of a job id the same request: its arguments, less the time it
    was submitted at, as canonical JSON."""
    request = {key: value for key, value in kwargs.items() if key != "submitted_at"} \
        if isinstance(kwargs, Mapping) else kwargs
    text = json.dumps([list(args or ()), request], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class _AcceptingCelery(Celery):  # type: ignore[misc]  # celery ships no type hints
    """Records every chat job it publishes, whichever call publishes it: submit(), or
    send_task() by code that goes around the contract; and publishes a job id once.

    The record (`accepted_key`) is written with SET NX before the publish, so a result lookup
    never sees a published job as unknown, and a second publish under the same id finds it:
    the same request is not queued again (its id is returned), a different one raises
    JobIdConflict. A record still "pending" means an earlier publish raised (Redis away): it
    may or may not have reached the queue, so the job is published again -- a job queued twice
    still runs once (the worker's lease) and stores one result.
    """

    accepted: redis.Redis | None = None
    accepted_ttl_s: int = 86_400
    log_content: bool = False

    def send_task(self, name: str, args: Any = None, kwargs: Any = None,
                  **options: Any) -> AsyncResult:
        # No queue declaration: the worker declares its queue; a publish only pushes, which is
        # all the producer's Redis user may do to a queue (README "Security").
        options.setdefault("declare", [])
        if name != TASK_NAME or self.accepted is None:
            return super().send_task(name, args, kwargs, **options)
        job_id = options["task_id"] = options.get("task_id") or uuid.uuid4().hex
        if not self.log_content:
            # What task events (Flower) and worker logs show of the job instead of the prompt.
            options.setdefault("argsrepr", "()")
            options.setdefault("kwargsrepr", "{'request': '<redacted>'}")
        key, digest = accepted_key(job_id), request_digest(args, kwargs)
        while not self.accepted.set(key, f"pending {digest}", nx=True, ex=self.accepted_ttl_s):
            current = self.accepted.get(key)
            if current is None:
                continue  # it expired just now: claim it
            text = current.decode() if isinstance(current, bytes) else str(current)
            state, _, stored = text.partition(" ")
            if stored and stored != digest:
                raise JobIdConflict(job_id)
            if state != "pending":
                # Queued, running or finished: the job is there; nothing to publish.
                return self.AsyncResult(job_id)
            break
        published = super().send_task(name, args, kwargs, **options)
        self.accepted.set(key, f"queued {digest}", xx=True, keepttl=True)
        return published


class ChatQueueClient:
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        # Job records, streams and cancels ride out a Redis restart as Celery's calls do.
        self._redis = redis.Redis.from_url(self.settings.broker_connection_url(),
                                           retry=Retry(ExponentialWithJitterBackoff(2, 0.1), 10))
        self.app = create_celery(self.settings, name="chatqueue-producer", cls=_AcceptingCelery)
        self.app.accepted, self.app.accepted_ttl_s = self._redis, self.settings.result_ttl_s
        self.app.log_content = self.settings.log_content
        # One step, so a cancel never marks an id that has no job record.
        self._cancel_script = self._redis.register_script(CANCEL_IF_KNOWN)

    def submit(self, request: ChatRequest | Mapping[str, Any]) -> str:
        """Queue a request; returns its job id (the client's own when it set one).

        A plain mapping is validated first: a bad one raises JobFailed naming the field, the
        limit and the value, and nothing is queued. Once this returns, the job is in Redis.

        A job id names one request for result_ttl_s: submitting the same request again under
        an id that is queued, running or finished queues nothing and returns the id; a
        different request under it raises JobIdConflict.
        """
        request = parse_request(request)
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
        """Shorthand: messages as plain dicts, generation parameters as keywords; bad ones raise
        JobFailed as submit() does."""
        return self.submit({"messages": messages, "params": params})

    def cancel(self, job_id: str) -> None:
        """Stop a job: a queued one never starts; a running one ends within one decode step
        with finish_reason "cancelled" and what it generated so far; a finished one keeps its
        result. Raises JobNotFound for a job never submitted or whose result expired."""
        known = self._cancel_script(keys=[accepted_key(job_id), cancel_key(job_id)],
                                    args=[self.settings.result_ttl_s, CANCEL_CHANNEL, job_id])
        if not known:
            raise self._not_found(job_id)

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[StreamEvent]:
        """The job's events from its first one, live, until its end event.

        A "start" event means the job (re)started from scratch -- after a worker crash it runs
        again -- so a consumer that concatenates text resets on it. Raises TimeoutError when
        nothing arrives for `timeout` seconds, JobNotFound for an unknown or expired job; rides
        out a Redis restart.
        """
        last_id, wait_s = "0-0", timeout or self.settings.wait_timeout_s
        if not self._redis.exists(stream_key(job_id)):
            self._check_known(job_id)
        quiet_since = time.monotonic()
        while True:
            try:
                # RESP2 (this client's protocol): [[key, [(entry id, {field: value}), ...]]]
                reply = cast("list[Any] | None", self._redis.xread(
                    {stream_key(job_id): last_id}, block=1000, count=500))
            except (redis.ConnectionError, redis.TimeoutError):
                reply = None
                time.sleep(_RECONNECT_WAIT_S)
            if not reply:
                if time.monotonic() - quiet_since > wait_s:
                    raise TimeoutError(f"no stream events for job {job_id} in {wait_s}s")
                continue
            quiet_since = time.monotonic()
            entries: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1]
            for entry_id, fields in entries:
                last_id = entry_id.decode()
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
        """Wait for a job and return its result; raises JobFailed with the structured error,
        JobNotFound at once for a job never submitted or whose result expired."""
        handle = AsyncResult(job_id, app=self.app)
        if handle.state == states.PENDING:
            self._check_known(job_id)
        try:
            payload = handle.get(
                timeout=timeout or self.settings.wait_timeout_s, propagate=False, interval=0.05
            )
        except CeleryTimeoutError as exc:
            # Drop the result subscription now: left to garbage collection it lingers, and its
            # cleanup then needs a Redis that may be gone.
            self.app.backend.remove_pending_result(handle)
            raise TimeoutError(f"job {job_id} did not finish within {timeout}s") from exc
        if handle.state == states.SUCCESS:
            return ChatResult.model_validate(payload)
        raise _as_job_failed(job_id, payload)

    def fetch(self, job_id: str) -> ChatResult | None:
        """The result if the job has finished, None while it is queued or running; raises
        JobFailed for a job that failed, JobNotFound for an unknown or expired one."""
        handle = AsyncResult(job_id, app=self.app)
        if handle.state in states.READY_STATES:
            return self.result(job_id)
        if handle.state == states.PENDING:
            self._check_known(job_id)
        return None

    def _check_known(self, job_id: str) -> None:
        """PENDING is what Celery says of a queued job and of one it never heard of alike; the
        key submit sets tells them apart for as long as a result would be kept."""
        if not self._redis.exists(accepted_key(job_id)):
            raise self._not_found(job_id)

    def _not_found(self, job_id: str) -> JobNotFound:
        return JobNotFound(
            f"job {job_id}: no such job, or it ended more than result_ttl_s "
            f"({self.settings.result_ttl_s} s) ago and its result expired"
        )

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


__all__ = ["ChatQueueClient", "JobFailed", "JobIdConflict", "JobNotFound"]
