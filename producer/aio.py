"""The asyncio twin of `ChatQueueClient`: same calls, contract, errors and guarantees.

Reads (results, streams, progress, cancel) use redis' asyncio client, and so does `submit`:
it validates and plans the job, then publishes it on the event loop with one script
(core.PUBLISH_JOBS) for every job submitted in that turn of the loop: each job's record claimed
with the request's digest (found with another request's: JobIdConflict; found queued: nothing
to do), its message LPUSHed and the record marked queued, all or nothing, in one command and
one round trip. The message is the one send_task would push, built by the synchronous client's
Celery app (`task_message`: Celery's task protocol, kombu's JSON and envelope, from a template
per queue; a test compares the two). Celery's send_task on a worker thread cost the gateway
about a millisecond of CPU per job, three blocking round trips and a GIL contended with its
event loop. With `submit_min_replicas` set, jobs still go through the synchronous
client's replicated publish (a WAIT on kombu's connection), in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from producer.errors import JobIdConflict, JobNotFound
from producer.schemas import ChatRequest, ChatResult, Progress, StreamEvent
from producer.settings import CANCEL_CHANNEL, ProducerSettings, accepted_key, cancel_key, stream_key

# Messages of up to this many jobs at once are built on the event loop (tens of microseconds
# each); more (a batch's chunk of lines) in a thread.
_BUILD_ON_LOOP = 128
# One publish script takes at most this many jobs (a batch's chunk of lines goes in several,
# one after another): Redis runs nothing else while a script runs.
_SCRIPT_JOBS = 256

# A result waiter reads the job's state at least this often: pub/sub only wakes it early, so a
# message lost (Redis restarting) delays a result by at most this much.
_POLL_S = 1.0


def _driver_info() -> dict[str, Any]:
    """One DriverInfo for every connection of the client: without it redis-py makes one per
    new connection, reading the package's metadata from disk on the event loop (about a
    millisecond each: a burst of 200 streams opens 200 connections)."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:  # redis-py before 7: no such lookup
        return {}
    return {"driver_info": DriverInfo()}


def _pack_in_c(client: aioredis.Redis) -> None:
    """Commands of `client`'s connections packed by hiredis in C, as redis-py's synchronous
    client packs them (HiredisRespSerializer); its asyncio connections pack in Python, one
    function call and a bytes join per argument. The gateway's reads of all its streams (one
    XREAD naming every stream: 400 arguments for 200 streams, once per engine step) and its
    publish scripts made this the largest CPU cost of a streamed request (profiled: ~2 ms of
    ~6 under cProfile). Without hiredis, nothing changes."""
    if not redis.utils.HIREDIS_AVAILABLE:
        return
    from redis.connection import HiredisRespSerializer

    pool = client.connection_pool
    make_connection = pool.make_connection

    def made_with_hiredis_packing() -> Any:
        connection = make_connection()  # type: ignore[no-untyped-call]
        connection.pack_command = HiredisRespSerializer().pack
        return connection

    pool.make_connection = made_with_hiredis_packing  # type: ignore[method-assign]


class _Wakeups:
    """One pub/sub connection for every result this client waits on: the result backend
    publishes each stored state on the job's meta key, which wakes that job's waiters."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._redis = client
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def subscribe(self, channel: str) -> asyncio.Event:
        event = asyncio.Event()
        waiters = self._waiters.setdefault(channel, set())
        waiters.add(event)
        if len(waiters) == 1:
            if self._pubsub is None:
                self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await self._pubsub.subscribe(channel)
            except BaseException:
                self._forget(channel, event)
                raise
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read())
        return event

    async def unsubscribe(self, channel: str, event: asyncio.Event) -> None:
        if self._forget(channel, event) and self._pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                await self._pubsub.unsubscribe(channel)

    def _forget(self, channel: str, event: asyncio.Event) -> bool:
        waiters = self._waiters.get(channel, set())
        waiters.discard(event)
        if waiters:
            return False
        self._waiters.pop(channel, None)
        return True

    async def _read(self) -> None:
        while self._waiters:
            try:
                message = await self._pubsub.get_message(timeout=_POLL_S)
            except (redis.ConnectionError, redis.TimeoutError):
                # redis-py subscribes again on reconnect; waiters poll meanwhile.
                await asyncio.sleep(core.RECONNECT_WAIT_S)
                continue
            except RuntimeError:  # nothing subscribed at this instant
                await asyncio.sleep(0.05)
                continue
            if message is not None and message.get("type") == "message":
                channel = message["channel"]
                channel = channel.decode() if isinstance(channel, bytes) else channel
                for event in self._waiters.get(channel, ()):
                    event.set()

    async def aclose(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(redis.RedisError):
                await self._pubsub.aclose()


class AsyncChatQueueClient:
    def __init__(self, settings: ProducerSettings | None = None, *,
                 max_connections: int = 2048) -> None:
        """`max_connections`: each stream being read holds one Redis connection while it
        blocks (XREAD); results share one pub/sub connection."""
        self.settings = settings or ProducerSettings()
        # Under Sentinel, a client of the current primary that follows a failover.
        self._redis: aioredis.Redis = async_redis_client(
            self.settings, retry=Retry(ExponentialWithJitterBackoff(2, 0.1), 10),
            max_connections=max_connections, **_driver_info())
        _pack_in_c(self._redis)
        self._wakeups = _Wakeups(self._redis)
        self._publisher = ChatQueueClient(self.settings)
        # Celery's result backend object decodes stored states (errors included); it does no
        # I/O here.
        self._backend = self._publisher.app.backend
        self._cancel_script = self._redis.register_script(CANCEL_IF_KNOWN)
        self._publish_script = self._redis.register_script(core.PUBLISH_JOBS)
        # Publishes called in this turn of the event loop, and the flushes under way.
        self._publishes: list[tuple[tuple[core.Submission, ...], asyncio.Future[None]]] = []
        self._flushes: set[asyncio.Future[None]] = set()

    @property
    def redis(self) -> aioredis.Redis:
        return self._redis

    @property
    def blocking(self) -> ChatQueueClient:
        """The synchronous client whose Celery app builds this one's messages (and which
        publishes them when submit_min_replicas is set)."""
        return self._publisher

    async def submit(self, request: ChatRequest | Mapping[str, Any]) -> str:
        """As ChatQueueClient.submit: a bad request raises JobFailed and queues nothing; once
        this returns, the job is in Redis; a job id names one request (JobIdConflict)."""
        job = core.plan_submission(request, self.settings)
        await self.publish(job)
        return job.job_id

    async def publish(self, *jobs: core.Submission) -> None:
        """As ChatQueueClient.publish, for planned jobs (a batch's lines), in order: each job's
        record claimed (SET NX, read back), then the messages of those it decides to publish
        pushed and their records marked queued. A job id that names another request raises
        JobIdConflict once the jobs before it are queued.

        The jobs of every publish called in one turn of the event loop go out together, in one
        script call (up to _SCRIPT_JOBS jobs): a burst of submits (the gateway's) costs a round
        trip or a few, not two each. No caller returns before the script that queued its jobs
        has answered; if Redis stays away past the client's retries, every caller raises."""
        if not jobs:
            return
        if self.settings.submit_min_replicas > 0:
            await asyncio.to_thread(self._publish_replicated, jobs)
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._publishes.append((jobs, done))
        if len(self._publishes) == 1:
            loop.call_soon(self._flush_publishes)
        await asyncio.shield(done)  # a caller that goes away leaves its jobs to the others

    def _flush_publishes(self) -> None:
        calls, self._publishes = self._publishes, []
        flush = asyncio.ensure_future(self._publish_calls(calls))
        self._flushes.add(flush)
        flush.add_done_callback(self._flushes.discard)

    async def _publish_calls(self, calls: list[tuple[tuple[core.Submission, ...],
                                                     asyncio.Future[None]]]) -> None:
        try:
            failures = await self._publish_together([jobs for jobs, _ in calls])
        except BaseException as exc:  # Redis away past the retries: every caller hears it
            for _, done in calls:
                if not done.done():
                    done.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (_, done), failure in zip(calls, failures, strict=True):
            if done.done():
                continue
            if failure is None:
                done.set_result(None)
            else:
                done.set_exception(failure)

    async def _publish_together(self, calls: list[tuple[core.Submission, ...]]
                                ) -> list[JobIdConflict | None]:
        """Each call's jobs, in order, up to a conflict (returned for that call): their
        messages built, then claimed, pushed and marked queued by one script
        (core.PUBLISH_JOBS) per up to _SCRIPT_JOBS jobs -- one command and one round trip
        where a pipeline of three commands a job took two."""
        jobs = [(number, job) for number, call in enumerate(calls) for job in call]
        build = self._publisher.app.task_message
        messages = [build(job) for _, job in jobs] if len(jobs) <= _BUILD_ON_LOOP \
            else await asyncio.to_thread(lambda: [build(job) for _, job in jobs])
        failures: list[JobIdConflict | None] = [None] * len(calls)
        for first in range(0, len(jobs), _SCRIPT_JOBS):
            keys: list[str] = []
            args: list[Any] = [self.settings.result_ttl_s]
            sent: list[tuple[int, core.Submission]] = []
            for (number, job), (queue, message) in zip(jobs[first:first + _SCRIPT_JOBS],
                                                       messages[first:first + _SCRIPT_JOBS],
                                                       strict=True):
                if failures[number] is not None:
                    continue  # after its call's conflict (in an earlier script): not published
                keys.append(accepted_key(job.job_id))
                args += [core.request_digest((), job.kwargs), number, queue, message]
                sent.append((number, job))
            if not sent:
                continue
            verdicts = await self._publish_script(keys=keys, args=args)
            for (number, job), verdict in zip(sent, verdicts, strict=True):
                if verdict == core.CONFLICT:
                    failures[number] = JobIdConflict(job.job_id)
        return failures

    def _publish_replicated(self, jobs: tuple[core.Submission, ...]) -> None:
        for job in jobs:
            self._publisher.publish(job)

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
        async for events in self.stream_batches(job_id, timeout):
            for event in events:
                yield event

    async def stream_batches(self, job_id: str, timeout: float | None = None, *,
                             submitted: bool = False) -> AsyncIterator[list[StreamEvent]]:
        """stream(), one list of events per read from Redis: what arrived together can be
        passed on together (the gateway writes each list to its client at once).
        `submitted`: the caller has just submitted the job, so it is known without a look."""
        cursor = core.StreamCursor(job_id, stream_key(job_id),
                                   timeout or self.settings.wait_timeout_s)
        # Known if its stream or its record exists: one round trip (a stream opened right after
        # its submit finds no stream yet, and paid a second one for the record).
        if not submitted and not await self._redis.exists(cursor.key, accepted_key(job_id)):
            raise self._not_found(job_id)
        while not cursor.done:
            try:
                reply = cast("list[Any] | None", await self._redis.xread(
                    {cursor.key: cursor.last_id}, block=core.STREAM_BLOCK_MS,
                    count=core.STREAM_COUNT))
            except (redis.ConnectionError, redis.TimeoutError):
                reply = None
                await asyncio.sleep(core.RECONNECT_WAIT_S)
            events = cursor.feed(reply)
            if events:
                yield events

    async def progress(self, job_id: str) -> Progress | None:
        state, info = await self._state_and_payload(job_id)
        return core.progress_from(state, info)

    async def state(self, job_id: str) -> str:
        return (await self._state_and_payload(job_id))[0]

    async def result(self, job_id: str, timeout: float | None = None) -> ChatResult:
        """As ChatQueueClient.result: wakes on the result backend's announcement of a stored
        state (one pub/sub connection shared by all waiters), reads the state at least every
        second, rides out a Redis restart."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout or self.settings.wait_timeout_s)
        channel, checked = core.task_meta_key(job_id), False
        wakeup: asyncio.Event | None = None
        try:
            while True:
                try:
                    if wakeup is None:
                        # Subscribed before the state is read: a state stored in between wakes.
                        wakeup = await self._wakeups.subscribe(channel)
                    wakeup.clear()
                    state, payload = await self._state_and_payload(job_id)
                    if state in core.READY_STATES:
                        return core.finished_result(job_id, state, payload)
                    if state == core.PENDING and not checked:
                        await self._check_known(job_id)
                        checked = True
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # Redis restarting: try again until the deadline
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise core.timeout_error(job_id, timeout)
                if wakeup is None:
                    await asyncio.sleep(min(remaining, core.RECONNECT_WAIT_S))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), min(remaining, _POLL_S))
        finally:
            if wakeup is not None:
                await self._wakeups.unsubscribe(channel, wakeup)

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
        return (core.PENDING, None) if raw is None else self.decode_meta(raw)

    def decode_meta(self, raw: bytes | str) -> tuple[str, object]:
        """A stored state as (Celery state, payload): for callers that read many jobs' states
        at once (the gateway's watch of its silent streams)."""
        meta = self._backend.decode_result(raw)
        return str(meta["status"]), meta.get("result")

    async def _check_known(self, job_id: str) -> None:
        if not await self._redis.exists(accepted_key(job_id)):
            raise self._not_found(job_id)

    def _not_found(self, job_id: str) -> JobNotFound:
        return core.not_found(job_id, self.settings)

    async def aclose(self) -> None:
        await asyncio.gather(*self._flushes, return_exceptions=True)
        await self._wakeups.aclose()
        await self._redis.aclose()
        await asyncio.to_thread(self._publisher.close)

    async def __aenter__(self) -> AsyncChatQueueClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


__all__ = ["AsyncChatQueueClient"]
