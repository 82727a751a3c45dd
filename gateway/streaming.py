"""Server-sent events of one job in OpenAI's chunk format, and the one watch over the results
of every stream that has gone silent.

What a stream costs the gateway is on the path of its first token: per stream it holds one
Redis connection (a blocking XREAD that wakes as the worker writes) and nothing else while
events flow. A job that fails, or that the worker refuses, writes no end event, so a stream
that stays silent for a while has its job's state looked at -- by `ResultWatch`, which reads
the states of all silent streams' jobs in one MGET a round, instead of a result waiter (a
subscription and a read a second) for each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import redis
from starlette.types import Receive, Scope, Send

from gateway.openai_api import ChunkWriter, error_body, job_error_body, job_error_status
from producer import core
from producer.aio import AsyncChatQueueClient
from producer.errors import JobFailed, JobNotFound
from producer.schemas import ChatResult, StreamEvent

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
        batches = client.stream_batches(self.job_id, timeout=timeout)
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
                    out.append(event_bytes(writer.first()))
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
                    chunk = writer.event(event)
                    if chunk is not None:
                        if event.type in ("thinking", "content") and not wrote_text:
                            wrote_text = True
                            self.gateway.metrics.first_token.observe(
                                time.perf_counter() - self.started)
                        out.append(event_bytes(chunk))
                    if event.type == "end":
                        self.finished = True
                # What arrived in one read goes out in one write.
                await send_body(send, out)
                if not self.finished:
                    next_batch = asyncio.ensure_future(anext(batches))
            if self.include_usage:
                # Stored right after the end event: waited for with the client's own waiter.
                result = await client.result(self.job_id, timeout=timeout)
                await send_body(send, [event_bytes(writer.usage(result))])
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
        await send_body(send, [event_bytes(body)])  # OpenAI's clients raise on an error event
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})


async def start(send: Send, status: int, media_type: str, headers: dict[str, str]) -> None:
    raw = [(b"content-type", media_type.encode()), (b"cache-control", b"no-cache")]
    raw += [(name.encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})


def event_bytes(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


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
