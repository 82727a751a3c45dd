"""Submit chat jobs and fetch their typed results. Imports no torch: safe in any backend."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any, cast

import redis
from celery import Celery, states
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import AsyncResult
from kombu import serialization
from kombu.entity import DELIVERY_MODES
from kombu.exceptions import BatchPublishError, OperationalError
from kombu.transport.redis import Channel as RedisChannel
from kombu.utils import json as kombu_json
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from producer import core
from producer.celery_app import broker_priority, create_celery
from producer.connections import redis_client
from producer.core import CANCEL_IF_KNOWN, parse_request, request_digest
from producer.errors import JobFailed, JobIdConflict, JobNotFound, NotReplicated
from producer.schemas import DEFAULT_PRIORITY, ChatRequest, ChatResult, Progress, StreamEvent
from producer.settings import (
    CANCEL_CHANNEL,
    TASK_NAME,
    ProducerSettings,
    accepted_key,
    cancel_key,
    stream_key,
)


def queue_key(queue: str, step: int) -> str:
    """The Redis list kombu's Redis transport keeps a queue's messages of a priority step in
    (producer/celery_app.py: step 0 is the queue's own name)."""
    return f"{queue}{RedisChannel.sep}{step}" if step else queue


class _MessageTemplate:
    """A job's Celery message as text, Celery's own message for a stand-in job with the
    job's id (task id, root id, correlation id), body and delivery tag put in its place: the
    same bytes send_task's message has (tests/unit/test_producer_wire.py compares them).
    Only for messages whose headers do not carry the request (no log_content)."""

    def __init__(self, app: _AcceptingCelery, queue: str, priority: int) -> None:
        marker = f"chatqueue-template-{uuid.uuid4().hex}"
        stand_in = core.Submission(job_id=f"{marker}-id", kwargs={"request": {}}, queue=queue)
        text, (self._args, _, self._embed) = app._build_task_message(
            stand_in, priority, f"{marker}-tag")
        body = json.loads(text)["body"]
        self._content_encoding = json.loads(text)["content-encoding"]
        # The text split around each quoted stand-in value, and which value goes in each gap.
        slots = {_quoted(stand_in.job_id): "id", _quoted(body): "body",
                 _quoted(f"{marker}-tag"): "tag"}
        self._parts: list[str] = []
        self._slots: list[str] = []
        rest = text
        while True:
            found = [(rest.find(quoted), quoted) for quoted in slots if quoted in rest]
            if not found:
                break
            at, quoted = min(found)
            self._parts.append(rest[:at])
            self._slots.append(slots[quoted])
            rest = rest[at + len(quoted):]
        self._parts.append(rest)
        assert self._slots.count("body") == 1 and self._slots.count("tag") == 1, self._slots

    def fill(self, job: core.Submission) -> str:
        data = kombu_json.dumps((self._args, job.kwargs, self._embed))  # type: ignore[no-untyped-call]
        values = {"id": _quoted(job.job_id), "tag": _quoted(str(uuid.uuid4())),
                  "body": _quoted(base64.b64encode(
                      data.encode(self._content_encoding)).decode("ascii"))}
        out = [self._parts[0]]
        for slot, part in zip(self._slots, self._parts[1:], strict=True):
            out.append(values[slot])
            out.append(part)
        return "".join(out)


def _quoted(value: str) -> str:
    """A string as kombu's JSON writes it."""
    return str(kombu_json.dumps(value))  # type: ignore[no-untyped-call]


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
    min_replicas: int = 0  # submit_min_replicas: see _publish_replicated
    replica_timeout_s: float = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Message templates by (queue, priority, publishing thread): task_message.
        self._templates: dict[tuple[str, int, str], _MessageTemplate] = {}

    def send_task(self, name: str, args: Any = None, kwargs: Any = None,
                  **options: Any) -> AsyncResult:
        # No queue declaration: the worker declares its queue; a publish only pushes, which is
        # all the producer's Redis user may do to a queue (README "Security").
        options.setdefault("declare", [])
        if name != TASK_NAME or self.accepted is None:
            return super().send_task(name, args, kwargs, **options)
        job_id = options["task_id"] = options.get("task_id") or uuid.uuid4().hex
        self._redact(options)
        key, digest = accepted_key(job_id), request_digest(args, kwargs)
        while not self.accepted.set(key, core.job_record("pending", digest), nx=True,
                                    ex=self.accepted_ttl_s):
            verdict = core.record_verdict(self.accepted.get(key), digest, job_id)
            if verdict == "claim":
                continue  # it expired just now: claim it
            if verdict == "exists":
                # Queued, running or finished: the job is there; nothing to publish.
                return self.AsyncResult(job_id)
            break
        if self.min_replicas > 0:
            return self._publish_replicated(name, args, kwargs, options, key, digest)
        published = super().send_task(name, args, kwargs, **options)
        self.accepted.set(key, core.job_record("queued", digest), xx=True, keepttl=True)
        return published

    def _redact(self, options: dict[str, Any]) -> None:
        if not self.log_content:
            # What task events (Flower) and worker logs show of the job instead of the prompt.
            options.setdefault("argsrepr", "()")
            options.setdefault("kwargsrepr", "{'request': '<redacted>'}")

    def task_message(self, job: core.Submission) -> tuple[str, str]:
        """The Redis list a job's message goes into and the message, as send_task() would
        push it, built without I/O: Celery's task protocol 2 (`create_task_message`, the
        headers and body send_task makes), serialized as JSON by kombu, in the envelope kombu's
        Redis transport pushes (body base64, delivery info, priority, a delivery tag). For a
        publisher that pushes it itself (AsyncChatQueueClient, on its event loop).
        tests/integration/test_clients.py compares it with what send_task pushes.

        Celery builds one message per queue, priority and publishing thread (a template);
        each job's message is that text with the job's id, body and delivery tag put in
        (_MessageTemplate): building it through Celery and kombu took ~75 us a job, the
        gateway's largest cost per request. With log_content the headers carry the request's
        repr, so every message is built in full."""
        priority = broker_priority(job.kwargs["request"].get("priority", DEFAULT_PRIORITY))
        key = queue_key(job.queue, priority)
        if self.log_content:
            return key, self._build_task_message(job, priority, str(uuid.uuid4()))[0]
        slot = (job.queue, priority, self.thread_oid)
        template = self._templates.get(slot)
        if template is None:
            template = self._templates[slot] = _MessageTemplate(self, job.queue, priority)
        return key, template.fill(job)

    def _build_task_message(self, job: core.Submission, priority: int, delivery_tag: str
                            ) -> tuple[str, Any]:
        """The message through Celery and kombu, and the (args, kwargs, embed) of its body."""
        options: dict[str, Any] = {}
        self._redact(options)
        headers, properties, body, _ = self.amqp.create_task_message(
            job.job_id, TASK_NAME, None, job.kwargs, reply_to=self.thread_oid,
            create_sent_event=False, ignore_result=None, **options)
        content_type, content_encoding, data = serialization.dumps(  # type: ignore[no-untyped-call]
            body, serializer=self.conf.task_serializer)
        properties.update(options)  # as send_task_message: options left over are properties
        properties.update(
            delivery_mode=DELIVERY_MODES.get(self.conf.task_default_delivery_mode,
                                             self.conf.task_default_delivery_mode),
            delivery_info={"exchange": "", "routing_key": job.queue},
            priority=priority, body_encoding="base64", delivery_tag=delivery_tag)
        payload = data.encode(content_encoding) if isinstance(data, str) else data
        message = {"body": base64.b64encode(payload).decode("ascii"),
                   "content-encoding": content_encoding, "content-type": content_type,
                   "headers": headers, "properties": properties}
        return str(kombu_json.dumps(message)), body  # type: ignore[no-untyped-call]

    def _publish_replicated(self, name: str, args: Any, kwargs: Any, options: dict[str, Any],
                            key: str, digest: str) -> AsyncResult:
        """Publish, then return only once the job's message and record are on min_replicas
        replicas: asynchronous replication loses what a primary acknowledged but had not yet
        sent when it died, and a Sentinel failover then promotes a replica without the job.

        Redis's WAIT counts the writes of the connection it runs on, and kombu publishes on a
        pooled connection of its own: so the publish goes into kombu's publish batch (one
        pipeline, one connection) and a rewrite of the job's record and the WAIT join that
        pipeline -- LPUSH, SET, WAIT on one connection. Only then is the record marked queued:
        a pipeline that fails (the primary died) or a WAIT short of replicas leaves it pending
        and publishes again (a job queued twice still runs once); past about 15 s (or three
        WAITs) it raises NotReplicated -- not accepted, and the record still pending, so
        submitting the same request again publishes and waits again.
        """
        deadline = time.monotonic() + max(15.0, 3 * self.replica_timeout_s)
        given = options.pop("producer", None)
        while True:
            try:
                with self.producer_or_acquire(given) as producer, producer.batch() as batch:
                    published = super().send_task(name, args, kwargs, producer=producer,
                                                  **options)
                    session = batch.state.session
                    if session is None:
                        raise RuntimeError("kombu did not batch the publish: cannot WAIT on "
                                           "its connection (submit_min_replicas)")
                    session.pipeline.set(key, core.job_record("pending", digest), xx=True,
                                         keepttl=True)
                    session.pipeline.execute_command(
                        "WAIT", self.min_replicas, int(self.replica_timeout_s * 1000))
                    replicas = int(session.pipeline.execute()[-1])
                if replicas >= self.min_replicas:
                    assert self.accepted is not None
                    self.accepted.set(key, core.job_record("queued", digest), xx=True, keepttl=True)
                    return published
                reason = f"on {replicas} of {self.min_replicas} replicas"
            except (redis.ConnectionError, redis.TimeoutError, BatchPublishError,
                    OperationalError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise NotReplicated(options["task_id"], reason)
            time.sleep(0.25)


class ChatQueueClient:
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        # Job records, streams and cancels ride out a Redis restart or a Sentinel failover as
        # Celery's calls do.
        self._redis = redis_client(self.settings,
                                   retry=Retry(ExponentialWithJitterBackoff(2, 0.1), 10))
        self.app = create_celery(self.settings, name="chatqueue-producer", cls=_AcceptingCelery)
        self.app.accepted, self.app.accepted_ttl_s = self._redis, self.settings.result_ttl_s
        self.app.log_content = self.settings.log_content
        self.app.min_replicas = self.settings.submit_min_replicas
        self.app.replica_timeout_s = self.settings.submit_replica_timeout_s
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
        job = core.plan_submission(request, self.settings)
        self.publish(job)
        return job.job_id

    def publish(self, job: core.Submission) -> None:
        """Publish a planned job: its record (SET NX with the request's digest), then Celery's
        message, retried while Redis restarts. The asyncio client publishes through this too."""
        priority = job.kwargs["request"].get("priority", DEFAULT_PRIORITY)
        self.app.send_task(TASK_NAME, kwargs=job.kwargs, task_id=job.job_id, queue=job.queue,
                           priority=broker_priority(priority))

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
        cursor = core.StreamCursor(job_id, stream_key(job_id),
                                   timeout or self.settings.wait_timeout_s)
        if not self._redis.exists(cursor.key):
            self._check_known(job_id)
        while not cursor.done:
            try:
                reply = cast("list[Any] | None", self._redis.xread(
                    {cursor.key: cursor.last_id}, block=core.STREAM_BLOCK_MS,
                    count=core.STREAM_COUNT))
            except (redis.ConnectionError, redis.TimeoutError):
                reply = None
                time.sleep(core.RECONNECT_WAIT_S)
            yield from cursor.feed(reply)

    def progress(self, job_id: str) -> Progress | None:
        """Tokens so far and phase while the job runs; None before it starts or once it ended."""
        handle = AsyncResult(job_id, app=self.app)
        return core.progress_from(handle.state, handle.info)

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
            raise core.timeout_error(job_id, timeout) from exc
        return core.finished_result(job_id, handle.state, payload)

    def fetch(self, job_id: str) -> ChatResult | None:
        """The result if the job has finished, None while it is queued or running; raises
        JobFailed for a job that failed, JobNotFound for an unknown or expired one."""
        # One read of the job's state, used as read: a second one (through result()) could find
        # the result expired in between, and wait for it as for a queued job.
        meta = self.app.backend.get_task_meta(job_id)
        state = meta["status"]
        if state in states.READY_STATES:
            return core.finished_result(job_id, state, meta["result"])
        if state == states.PENDING:
            self._check_known(job_id)
        return None

    def _check_known(self, job_id: str) -> None:
        """PENDING is what Celery says of a queued job and of one it never heard of alike; the
        key submit sets tells them apart for as long as a result would be kept."""
        if not self._redis.exists(accepted_key(job_id)):
            raise self._not_found(job_id)

    def _not_found(self, job_id: str) -> JobNotFound:
        return core.not_found(job_id, self.settings)

    @property
    def redis(self) -> redis.Redis:
        """The client's Redis connection (job records, streams, cancels; a batch collector)."""
        return self._redis

    def close(self) -> None:
        self._redis.close()
        self.app.close()

    def __enter__(self) -> ChatQueueClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


__all__ = ["CANCEL_IF_KNOWN", "ChatQueueClient", "JobFailed", "JobIdConflict", "JobNotFound",
           "parse_request", "request_digest"]
