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
import contextlib
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


class _Subscription:
    def __init__(self, cursor: core.StreamCursor) -> None:
        self.cursor = cursor
        self.inbox: asyncio.Queue[list[StreamEvent] | BaseException] = asyncio.Queue()


class StreamHub:
    """The streams of the jobs being relayed, read together (see the module's docstring):
    `batches` is AsyncChatQueueClient.stream_batches for a job just submitted."""

    def __init__(self, client: AsyncChatQueueClient) -> None:
        self.client = client
        self._subscriptions: dict[str, _Subscription] = {}
        # Streams that wait for a read (in order of arrival), read at the next flush.
        self._idle: dict[str, None] = {}
        self._flush_due = False
        self._reads: set[asyncio.Task[None]] = set()

    async def batches(self, job_id: str, timeout: float) -> AsyncIterator[list[StreamEvent]]:
        key = stream_key(job_id)
        if key in self._subscriptions:  # streamed twice at once: the second reads on its own
            async for events in self.client.stream_batches(job_id, timeout, submitted=True):
                yield events
            return
        subscription = self._subscriptions[key] = _Subscription(
            core.StreamCursor(job_id, key, timeout))
        self._wait_for_read(key)
        try:
            while True:
                item = await subscription.inbox.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if subscription.cursor.done and subscription.inbox.empty():
                    return
        finally:
            if self._subscriptions.get(key) is subscription:
                del self._subscriptions[key]
            self._idle.pop(key, None)

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
        self._flush_due = False
        keys = [key for key in self._idle if key in self._subscriptions]
        self._idle.clear()
        if keys:
            read = asyncio.create_task(self._read(keys))
            self._reads.add(read)
            read.add_done_callback(self._reads.discard)

    async def _read(self, keys: list[str]) -> None:
        streams: dict[Any, Any] = {key: self._subscriptions[key].cursor.last_id
                                   for key in keys}
        try:
            reply = cast("list[Any] | None", await self.client.redis.xread(
                streams, block=core.STREAM_BLOCK_MS, count=core.STREAM_COUNT))
        except (redis.ConnectionError, redis.TimeoutError):
            await asyncio.sleep(core.RECONNECT_WAIT_S)  # Redis restarting: read again
            reply = None
        except Exception as exc:  # the streams end with it; the hub goes on
            for key in keys:
                if (subscription := self._subscriptions.get(key)) is not None:
                    subscription.inbox.put_nowait(exc)
            return
        entries = {_text(key): items for key, items in (reply or [])}
        for key in keys:
            subscription = self._subscriptions.get(key)
            if subscription is None:
                continue  # its client went away while it was read
            items = entries.get(key)
            try:
                # A stream without entries is fed nothing: its cursor keeps its silence's
                # timeout, as a read of its own that came back empty would.
                events = subscription.cursor.feed([(key, items)] if items else None)
            except TimeoutError as exc:
                subscription.inbox.put_nowait(exc)
                continue
            if events:
                subscription.inbox.put_nowait(events)
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
        watch = self.gateway.result_watch
        batches = self.gateway.stream_hub.batches(self.job_id, timeout)
        next_batch: asyncio.Future[list[StreamEvent]] = asyncio.ensure_future(anext(batches))
        writer, wrote_text = ChunkWriter(self.job_id, self.model), False
        # The job's result, watched once the stream stayed silent a while: off the path of a
        # stream whose events flow.
        watched: asyncio.Future[ChatResult] | None = None
        try:
            while not self.finished:
                if watched is None:
                    await asyncio.wait({next_batch}, timeout=SILENCE_S)
                    if not next_batch.done():
                        watched = watch.watch(self.job_id)
                        continue
                elif not watched.done():
                    either: set[asyncio.Future[Any]] = {next_batch, watched}
                    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await asyncio.wait({next_batch})
                if not next_batch.done():
                    assert watched is not None and watched.done()
                    failure = watched.exception()
                    if failure is None:
                        continue  # finished: its end event is on its way
                    self.finished = True
                    await self._fail(send, writer, failure)
                    return
                try:
                    events = next_batch.result()
                except StopAsyncIteration:
                    break
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
                if not self.finished:
                    next_batch = asyncio.ensure_future(anext(batches))
            if self.include_usage:
                # Stored right after the end event: waited for with the client's own waiter.
                result = await client.result(self.job_id, timeout=timeout)
                await send_body(send, [sse(writer.usage(result))])
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                        "more_body": False})
        finally:
            next_batch.cancel()
            watch.forget(self.job_id)
            with contextlib.suppress(Exception):
                await batches.aclose()  # type: ignore[attr-defined]

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
