"""The asyncio twin of `ChatQueueClient`: same calls, contract, errors and guarantees.

Reads (results, streams, progress, cancel) use redis' asyncio client. `submit` validates and
plans the job on the event loop, then publishes it in a worker thread through the synchronous
client's one publish path -- the job record written with SET NX and the request's digest,
then Celery's own message, with the same publish retries. That keeps one implementation of
the "a job id names one request" guarantee and leaves Celery's wire format to kombu, for the
price of a thread hop (about a millisecond) per submit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any, cast

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff

from producer import core
from producer.client import ChatQueueClient
from producer.connections import async_redis_client
from producer.core import CANCEL_IF_KNOWN
from producer.errors import JobNotFound
from producer.schemas import ChatRequest, ChatResult, Progress, StreamEvent
from producer.settings import CANCEL_CHANNEL, ProducerSettings, accepted_key, cancel_key, stream_key

# A result waiter wakes at least this often to check its deadline.
_POLL_S = 1.0


class AsyncChatQueueClient:
    def __init__(self, settings: ProducerSettings | None = None) -> None:
        self.settings = settings or ProducerSettings()
        # Under Sentinel, a client of the current primary that follows a failover.
        self._redis: aioredis.Redis = async_redis_client(
            self.settings, retry=Retry(ExponentialWithJitterBackoff(2, 0.1), 10))
        self._publisher = ChatQueueClient(self.settings)
        # Celery's result backend object decodes stored states (errors included); it does no
        # I/O here.
        self._backend = self._publisher.app.backend
        self._cancel_script = self._redis.register_script(CANCEL_IF_KNOWN)

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    async def submit(self, request: ChatRequest | Mapping[str, Any]) -> str:
        """As ChatQueueClient.submit: a bad request raises JobFailed and queues nothing; once
        this returns, the job is in Redis; a job id names one request (JobIdConflict)."""
        job = core.plan_submission(request, self.settings)
        await asyncio.to_thread(self._publisher.publish, job)
        return job.job_id

    def queue_for(self, request: ChatRequest) -> str:
        return self.settings.queue_for(request.model or self.settings.default_model)

    async def submit_chat(self, messages: list[dict[str, str]], **params: Any) -> str:
        return await self.submit({"messages": messages, "params": params})

    async def cancel(self, job_id: str) -> None:
        """As ChatQueueClient.cancel; JobNotFound for a job never submitted or expired."""
        known = await self._cancel_script(
            keys=[accepted_key(job_id), cancel_key(job_id)],
            args=[self.settings.result_ttl_s, CANCEL_CHANNEL, job_id])
        if not known:
            raise core.not_found(job_id, self.settings)

    async def stream(self, job_id: str, timeout: float | None = None
                     ) -> AsyncIterator[StreamEvent]:
        """As ChatQueueClient.stream, as an async iterator."""
        cursor = core.StreamCursor(job_id, stream_key(job_id),
                                   timeout or self.settings.wait_timeout_s)
        if not await self._redis.exists(cursor.key):
            await self._check_known(job_id)
        while not cursor.done:
            try:
                reply = cast("list[Any] | None", await self._redis.xread(
                    {cursor.key: cursor.last_id}, block=core.STREAM_BLOCK_MS,
                    count=core.STREAM_COUNT))
            except (redis.ConnectionError, redis.TimeoutError):
                reply = None
                await asyncio.sleep(core.RECONNECT_WAIT_S)
            for event in cursor.feed(reply):
                yield event

    async def progress(self, job_id: str) -> Progress | None:
        state, info = await self._state_and_payload(job_id)
        return core.progress_from(state, info)

    async def state(self, job_id: str) -> str:
        return (await self._state_and_payload(job_id))[0]

    async def result(self, job_id: str, timeout: float | None = None) -> ChatResult:
        """As ChatQueueClient.result: waits on the result backend's own announcement (the
        pub/sub channel a stored state is published on), rides out a Redis restart."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.settings.wait_timeout_s)
        channel, checked = core.task_meta_key(job_id), False
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    # Read after subscribing: a state stored in between is not missed.
                    state, payload = await self._state_and_payload(job_id)
                    if state == core.PENDING and not checked:
                        await self._check_known(job_id)
                        checked = True
                    while state not in core.READY_STATES:
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            raise core.timeout_error(job_id, timeout)
                        message = await pubsub.get_message(timeout=min(remaining, _POLL_S))
                        if message is not None and message.get("type") == "message":
                            state, payload = self._decode(message["data"])
                    return core.finished_result(job_id, state, payload)
            except (redis.ConnectionError, redis.TimeoutError):
                if loop.time() >= deadline:
                    raise core.timeout_error(job_id, timeout) from None
                await asyncio.sleep(core.RECONNECT_WAIT_S)

    async def fetch(self, job_id: str) -> ChatResult | None:
        """As ChatQueueClient.fetch."""
        state, payload = await self._state_and_payload(job_id)
        if state in core.READY_STATES:
            return core.finished_result(job_id, state, payload)
        if state == core.PENDING:
            await self._check_known(job_id)
        return None

    async def _state_and_payload(self, job_id: str) -> tuple[str, object]:
        raw = await self._redis.get(core.task_meta_key(job_id))
        return (core.PENDING, None) if raw is None else self._decode(raw)

    def _decode(self, raw: bytes | str) -> tuple[str, object]:
        meta = self._backend.decode_result(raw)
        return str(meta["status"]), meta.get("result")

    async def _check_known(self, job_id: str) -> None:
        if not await self._redis.exists(accepted_key(job_id)):
            raise self._not_found(job_id)

    def _not_found(self, job_id: str) -> JobNotFound:
        return core.not_found(job_id, self.settings)

    async def aclose(self) -> None:
        await self._redis.aclose()
        await asyncio.to_thread(self._publisher.close)

    async def __aenter__(self) -> AsyncChatQueueClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


__all__ = ["AsyncChatQueueClient"]
