"""Server-sent events of one job in OpenAI's chunk format; the hub that reads every relayed
job's stream; the one watch over the results of every stream that has gone silent.

What a stream costs the gateway is on the path of its first token, and of every request that
arrives while streams flow: so the streams are read together -- `StreamHub` reads all streams
that wait for events with one blocking XREAD over their keys, and when it returns (a worker
wrote to any of them), hands each stream its events and reads all of them again with one
XREAD. A stream opened meanwhile gets an XREAD of its own at once (nothing waits for a read in
flight), which merges into the next one. Per engine step that is a round trip or a few for all
streams, where a blocking XREAD per stream made one per stream, each on its own connection
(a burst of 200 streams opened 200). A job that fails, or that the worker refuses, writes no
end event, so a stream that stays silent for a while has its job's state looked at -- by
`ResultWatch`, which reads the states of all silent streams' jobs in one MGET a round,
instead of a result waiter (a subscription and a read a second) for each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import redis
from starlette.types import Receive, Scope, Send

from gateway.openai_api import ChunkWriter, error_body, job_error_body, job_error_status, sse
from producer import core
from producer.aio import AsyncChatQueueClient
from producer.errors import JobFailed, JobNotFound
from producer.schemas import ChatResult, StreamEvent
from producer.settings import stream_key

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger(__name__)

# A stream silent this long gets its job's state watched (a refused job writes no event).
SILENCE_S = 0.25
# How often the watch reads the states of the silent streams' jobs (one MGET for all).
WATCH_INTERVAL_S = 0.25
# How often the hub looks at the timeouts of streams left out of its reads' replies.
SILENCE_CHECK_S = 0.5
# Loop turns a new read waits at most for the other reads out to come back and join it.
FLUSH_DEFERRALS = 2


class ResultWatch:
    """Futures of the results of the jobs being watched, all read in one MGET a round."""

    def __init__(self, client: AsyncChatQueueClient, interval_s: float = WATCH_INTERVAL_S
                 ) -> None:
        self.client, self.interval_s = client, interval_s
        self._futures: dict[str, asyncio.Future[ChatResult]] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, job_id: str) -> asyncio.Future[ChatResult]:
        future = self._futures.get(job_id)
        if future is None:
            future = self._futures[job_id] = asyncio.get_running_loop().create_future()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return future

    def forget(self, job_id: str) -> None:
        future = self._futures.pop(job_id, None)
        if future is not None and not future.cancelled() and future.done():
            future.exception()  # retrieved: no "never retrieved" warning
        elif future is not None:
            future.cancel()

    async def _run(self) -> None:
        while self._futures:
            await asyncio.sleep(self.interval_s)
            job_ids = [job_id for job_id, future in self._futures.items() if not future.done()]
            if not job_ids:
                continue
            try:
                raws = await self.client.redis.mget([core.task_meta_key(j) for j in job_ids])
            except redis.RedisError as exc:  # Redis away: the streams time out on their own
                log.debug("result watch: %s", exc)
                continue
            for job_id, raw in zip(job_ids, raws, strict=True):
                future = self._futures.get(job_id)
                if raw is None or future is None or future.done():
                    continue
                state, payload = self.client.decode_meta(raw)
                if state not in core.READY_STATES:
                    continue
                try:
                    future.set_result(core.finished_result(job_id, state, payload))
                except JobFailed as failed:
                    future.set_exception(failed)

    async def aclose(self) -> None:
        for job_id in list(self._futures):
            self.forget(job_id)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class Subscription:
    """One stream's events as the hub hands them over: taken by its reader, which waits on one
    future of its own between them (no queue, task or `asyncio.wait` per event: a stream's
    chunk is on the path of every other stream's, and of each request coming in meanwhile)."""

    def __init__(self, cursor: core.StreamCursor) -> None:
        self.cursor = cursor
        self._events: list[StreamEvent] = []
        self._failure: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._feeder: asyncio.Task[None] | None = None  # a stream read on its own (see hub)

    @property
    def ready(self) -> bool:
        """Events or a failure to take."""
        return bool(self._events) or self._failure is not None

    @property
    def ended(self) -> bool:
        """Its end event read and taken: nothing more comes."""
        return self.cursor.done and not self._events

    def deliver(self, events: list[StreamEvent]) -> None:
        self._events += events
        self.wake()

    def fail(self, failure: BaseException) -> None:
        self._failure = failure
        self.wake()

    def wake(self) -> None:
        """Ends the reader's wait (also for news that is not the stream's: a watched result)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def take(self) -> list[StreamEvent]:
        """The events delivered since the last take; raises the stream's failure once they
        are taken."""
        if self._events:
            events, self._events = self._events, []
            return events
        if self._failure is not None:
            raise self._failure
        return []

    async def wait(self, timeout: float | None = None) -> bool:
        """Until something is ready, `wake` is called, or `timeout` seconds pass; whether
        something is ready."""
        if self.ready:
            return True
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, _settle, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()
        return self.ready


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StreamHub:
    """The streams of the jobs being relayed, read together (see the module's docstring):
    `subscribe` a job just submitted, then take its events from the subscription (or iterate
    `batches`, AsyncChatQueueClient.stream_batches's shape), and `unsubscribe` it."""

    def __init__(self, client: AsyncChatQueueClient) -> None:
        self.client = client
        self._subscriptions: dict[str, Subscription] = {}
        # Streams that wait for a read (in order of arrival), read at the next flush.
        self._idle: dict[str, None] = {}
        self._flush_due = False
        self._reads: set[asyncio.Task[None]] = set()
        self._blocked = 0  # reads waiting on Redis now
        self._deferrals = 0  # loop turns the pending flush has waited for them
        # When the streams left out of a read's reply last had their silence looked at.
        self._silence_checked_at = time.monotonic()

    def subscribe(self, job_id: str, timeout: float) -> Subscription:
        """`timeout`: the most seconds the stream may stay silent (then it fails with
        TimeoutError)."""
        key = stream_key(job_id)
        subscription = Subscription(core.StreamCursor(job_id, key, timeout))
        if key in self._subscriptions:
            # Streamed twice at once: the second reads on its own.
            subscription._feeder = asyncio.create_task(self._feed_alone(subscription))
            return subscription
        self._subscriptions[key] = subscription
        self._wait_for_read(key)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        if subscription._feeder is not None:
            subscription._feeder.cancel()
            return
        key = subscription.cursor.key
        if self._subscriptions.get(key) is subscription:
            del self._subscriptions[key]
        self._idle.pop(key, None)

    async def _feed_alone(self, subscription: Subscription) -> None:
        cursor = subscription.cursor
        try:
            async for events in self.client.stream_batches(cursor.job_id, cursor.wait_s,
                                                           submitted=True):
                subscription.deliver(events)
            subscription.cursor.done = True
        except Exception as exc:
            subscription.fail(exc)

    async def batches(self, job_id: str, timeout: float) -> AsyncIterator[list[StreamEvent]]:
        subscription = self.subscribe(job_id, timeout)
        try:
            while not subscription.ended:
                await subscription.wait()
                if events := subscription.take():
                    yield events
        finally:
            self.unsubscribe(subscription)

    @property
    def reads_in_flight(self) -> int:
        return len(self._reads)

    def _wait_for_read(self, key: str) -> None:
        self._idle[key] = None
        if not self._flush_due:
            self._flush_due = True
            # Once this loop iteration is done: what came back or opened in it shares a read.
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._blocked and self._deferrals < FLUSH_DEFERRALS:
            # Another read is out: one worker write (a MULTI/EXEC) wakes every read at once,
            # and their replies come back a loop turn or two apart. Waiting for them lets the
            # streams of all of them share the next read -- re-read apart, reads that split
            # once (streams opened while a read was out) stayed split, each paying the round
            # trip and the command's packing again at every step.
            self._deferrals += 1
            asyncio.get_running_loop().call_soon(self._flush)
            return
        self._flush_due, self._deferrals = False, 0
        keys = [key for key in self._idle if key in self._subscriptions]
        self._idle.clear()
        if keys:
            read = asyncio.create_task(self._read(keys))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)

    async def _read(self, keys: list[str]) -> None:
        streams: dict[Any, Any] = {key: self._subscriptions[key].cursor.last_id
                                   for key in keys}
        self._blocked += 1
        try:
            reply = cast("list[Any] | None", await self.client.redis.xread(
                streams, block=core.STREAM_BLOCK_MS, count=core.STREAM_COUNT))
        except (redis.ConnectionError, redis.TimeoutError):
            await asyncio.sleep(core.RECONNECT_WAIT_S)  # Redis restarting: read again
            reply = None
        except Exception as exc:  # the streams end with it; the hub goes on
            for key in keys:
                if (subscription := self._subscriptions.get(key)) is not None:
                    subscription.fail(exc)
            return
        finally:
            self._blocked -= 1
        entries = {_text(key): items for key, items in (reply or [])}
        now = time.monotonic()
        # The silence of the streams a reply leaves out (their cursors' timeouts) is looked at
        # when nothing came at all, or at most every SILENCE_CHECK_S: not for each of the
        # waiting streams at every step of the others.
        check_silence = not entries or now - self._silence_checked_at >= SILENCE_CHECK_S
        if check_silence:
            self._silence_checked_at = now
        for key in keys:
            subscription = self._subscriptions.get(key)
            if subscription is None:
                continue  # its client went away while it was read
            items = entries.get(key)
            if not items and not check_silence:
                self._wait_for_read(key)
                continue
            try:
                # A stream without entries is fed nothing: its cursor keeps its silence's
                # timeout, as a read of its own that came back empty would.
                events = subscription.cursor.feed([(key, items)] if items else None, now)
            except TimeoutError as exc:
                subscription.fail(exc)
                continue
            if events:
                subscription.deliver(events)
            if not subscription.cursor.done:
                self._wait_for_read(key)

    async def aclose(self) -> None:
        for read in list(self._reads):
            read.cancel()
        await asyncio.gather(*self._reads, return_exceptions=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class JobStream:
    """Server-sent events of one job in OpenAI's chunk format. The status is decided at the
    job's first event, so a request the worker refuses still gets its 400; a client that goes
    away cancels the job."""

    def __init__(self, gateway: Gateway, job_id: str, model: str, include_usage: bool,
                 started: float) -> None:
        self.gateway, self.job_id, self.model, self.started = gateway, job_id, model, started
        self.include_usage, self.finished = include_usage, False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        gone = asyncio.ensure_future(disconnected(receive))
        await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        if pump.done():
            gone.cancel()
            pump.result()
            return
        pump.cancel()
        await asyncio.gather(pump, return_exceptions=True)
        if not self.finished:
            await self.gateway.cancel_for_disconnect(self.job_id)

    async def _pump(self, send: Send) -> None:
        client, timeout = self.gateway.client, self.gateway.settings.request_timeout_s
        watch, hub = self.gateway.result_watch, self.gateway.stream_hub
        stream = hub.subscribe(self.job_id, timeout)
        writer, wrote_text = ChunkWriter(self.job_id, self.model), False
        # The job's result, watched once the stream stayed silent a while: off the path of a
        # stream whose events flow. Its outcome wakes the stream's wait.
        watched: asyncio.Future[ChatResult] | None = None
        try:
            while not self.finished:
                if not stream.ready:
                    if watched is None:
                        if not await stream.wait(SILENCE_S):
                            watched = watch.watch(self.job_id)
                            watched.add_done_callback(lambda _: stream.wake())
                            continue
                    else:
                        await stream.wait()
                if not stream.ready:
                    if watched is None or not watched.done():
                        continue
                    failure = watched.exception()
                    if failure is None:
                        await stream.wait()  # finished: its end event is on its way
                        continue
                    self.finished = True
                    await self._fail(send, writer, failure)
                    return
                try:
                    events = stream.take()
                except (TimeoutError, JobNotFound) as exc:
                    self.finished = True
                    await self._fail(send, writer, exc)
                    return
                out: list[bytes] = []
                if not writer.started:
                    await start(send, 200, "text/event-stream",
                                {"x-chatqueue-job-id": self.job_id})
                    out.append(sse(writer.first()))
                for event in events:
                    if event.type == "start" and wrote_text:
                        # The job runs again from its start (its worker died): what was sent
                        # is void.
                        await send_body(send, out)
                        self.finished = True
                        await self._fail(send, writer, RuntimeError(
                            "the job restarted after a worker failure; its output so far is "
                            "void"))
                        return
                    chunk = writer.event_bytes(event)
                    if chunk is not None:
                        if event.type in ("thinking", "content") and not wrote_text:
                            wrote_text = True
                            self.gateway.metrics.first_token.observe(
                                time.perf_counter() - self.started)
                        out.append(chunk)
                    if event.type == "end":
                        self.finished = True
                # What arrived in one read goes out in one write.
                await send_body(send, out)
                if stream.ended and not self.finished:
                    break
            if self.include_usage:
                # Stored right after the end event: waited for with the client's own waiter.
                result = await client.result(self.job_id, timeout=timeout)
                await send_body(send, [sse(writer.usage(result))])
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
        finally:
            hub.unsubscribe(stream)
            watch.forget(self.job_id)

    async def _fail(self, send: Send, writer: ChunkWriter, failure: BaseException) -> None:
        if isinstance(failure, JobFailed):
            status, body = job_error_status(failure.error), job_error_body(failure.error)
        elif isinstance(failure, TimeoutError):
            await cancel_quietly(self.gateway.client, self.job_id)
            status, body = 504, error_body(str(failure), type_="timeout_error", code="timeout")
        else:
            status, body = 500, error_body(str(failure), type_="server_error",
                                           code="internal_error")
        if not writer.started:
            payload = json.dumps(body).encode()
            await start(send, status, "application/json", {"x-chatqueue-job-id": self.job_id})
            await send({"type": "http.response.body", "body": payload, "more_body": False})
            return
        await send_body(send, [sse(body)])  # OpenAI's clients raise on an error event
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})


async def start(send: Send, status: int, media_type: str, headers: dict[str, str]) -> None:
    raw = [(b"content-type", media_type.encode()), (b"cache-control", b"no-cache")]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})


async def send_body(send: Send, parts: list[bytes]) -> None:
    if parts:
        await send({"type": "http.response.body", "body": b"".join(parts), "more_body": True})


async def disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_quietly(client: AsyncChatQueueClient, job_id: str) -> None:
    try:
        await client.cancel(job_id)
    except (JobNotFound, redis.RedisError) as exc:
        log.warning("cancel of job %s failed: %s", job_id, exc)
