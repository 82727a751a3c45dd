"""The asyncio twin of `BatchClient`: submit a Batch JSONL file, follow it, read its results,
cancel it, list batches -- on an `AsyncChatQueueClient`, with no call run in a thread but the
file reads and the publishes (which go through the synchronous client's one publish path, as
AsyncChatQueueClient.submit does).

What a batch means -- ids and keys, how a line reads, how a chunk is planned, how a record
reads as OpenAI's Batch object, how a result reads as an output line -- is producer.batches'
pure functions, shared with the blocking client; so is what a store holds (`StoreBase`) and
every pure step of its reads and writes. Only the Redis round trips are spelled here, command
for command those of `producer.batches.store.BatchStore`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from producer.aio import AsyncChatQueueClient
from producer.batches import (
    BATCHES_KEY,
    DEFAULT_WINDOW,
    SUBMIT_CHUNK,
    LinePolicy,
    SubmitReport,
    batch_cancel_key,
    batch_errors_key,
    batch_id_for_digest,
    batch_ids_key,
    batch_key,
    batch_lines_key,
    batch_object,
    batch_status,
    named_lines,
    parse_window,
    plan_chunk,
    read_line,
    task_meta,
    valid_batch_id,
)
from producer.batches.client import file_digest
from producer.batches.lifecycle import lines_known
from producer.batches.outputs import Line, result_line
from producer.batches.plan import Read
from producer.batches.store import (
    Row,
    StoreBase,
    as_text,
    chunk_rows,
    new_record,
    queue_progress,
    queued_job_ids,
)
from producer.schemas import BATCH_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from producer.settings import CANCEL_CHANNEL

_OVER = ("completed", "expired", "cancelled", "failed")


class AsyncBatchStore(StoreBase[aioredis.Redis]):
    """BatchStore's reads and writes on redis' asyncio client."""

    _record_line_error: AsyncScript  # what the asyncio client registers

    async def create(self, batch_id: str, *, window: str, window_s: float, priority: int,
                     input_file: str, metadata: Mapping[str, str] | None, now: float,
                     stream: bool = False, max_request_bytes: int | None = None) -> bool:
        key = batch_key(batch_id)
        if not await self.redis.hsetnx(key, "id", batch_id):
            return False
        await self.redis.hset(key, mapping=new_record(
            window=window, window_s=window_s, priority=priority,
            input_file=input_file, metadata=metadata, now=now, stream=stream,
            max_request_bytes=max_request_bytes))
        await self.redis.expire(key, self._ttl(window_s))
        await self.redis.zadd(BATCHES_KEY, {batch_id: now})
        return True

    async def record(self, batch_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(batch_key(batch_id))
        return {as_text(key): as_text(value) for key, value in raw.items()}

    async def claim_lines(self, batch_id: str, lines: list[tuple[int, str]]) -> list[bool]:
        ids = batch_ids_key(batch_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for index, custom_id in lines:
                pipe.hsetnx(ids, custom_id, index)
            fresh = await pipe.execute()
        async with self.redis.pipeline(transaction=False) as pipe:
            for (_, custom_id), new in zip(lines, fresh, strict=True):
                if not new:
                    pipe.hget(ids, custom_id)
            owners = iter(await pipe.execute())
        return [bool(new) or int(next(owners)) == index
                for (index, _), new in zip(lines, fresh, strict=True)]

    async def save_lines(self, batch_id: str, lines: list[tuple[int, str | None]],
                         errors: list[tuple[int, dict[str, Any]]], window_s: float) -> None:
        ttl = self._ttl(window_s)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(batch_lines_key(batch_id),
                      mapping={index: custom_id or "" for index, custom_id in lines})
            for index, line in errors:
                await self._record_line_error(
                    keys=[batch_errors_key(batch_id), batch_key(batch_id)],
                    args=[index, json.dumps(line)], client=pipe)
            queue_progress(pipe, batch_id, lines, ttl)
            await pipe.execute()

    async def finish_submission(self, batch_id: str, total: int) -> None:
        await self.redis.hset(batch_key(batch_id), mapping={"total": total, "seen": total})
        await self.mark_finished_if_done(batch_id)

    async def fail(self, batch_id: str, reason: str) -> None:
        await self.redis.hset(batch_key(batch_id),
                              mapping={"failed_at": time.time(), "errors": reason})

    async def cancel(self, batch_id: str, window_s: float) -> None:
        await self.redis.set(batch_cancel_key(batch_id), 1, ex=self._ttl(window_s))
        await self.redis.hsetnx(batch_key(batch_id), "cancelling_at", time.time())
        # Running lines: every worker's cancel listener takes a batch id for all its lines.
        await self.redis.publish(CANCEL_CHANNEL, batch_id)
        await self.mark_finished_if_done(batch_id)

    async def mark_finished_if_done(self, batch_id: str) -> None:
        total, completed, failed = await self.redis.hmget(
            batch_key(batch_id), ["total", "completed", "failed"])
        if total and int(completed or 0) + int(failed or 0) >= int(total):
            await self.redis.hsetnx(batch_key(batch_id), "finished_at", time.time())

    async def lines(self, batch_id: str, total: int, chunk: int = 500) -> AsyncIterator[Row]:
        for start in range(0, total, chunk):
            indexes = list(range(start, min(total, start + chunk)))
            custom_ids = await self.redis.hmget(batch_lines_key(batch_id), indexes)
            errors = await self.redis.hmget(batch_errors_key(batch_id), indexes)
            job_ids = queued_job_ids(batch_id, custom_ids, errors)
            wanted = [task_meta(job_id) for job_id in job_ids if job_id is not None]
            metas = await self.redis.mget(wanted) if wanted else []
            for row in chunk_rows(indexes, custom_ids, errors, job_ids, metas):
                yield row

    async def list(self, limit: int = 100) -> list[str]:
        return [as_text(i) for i in await self.redis.zrevrange(BATCHES_KEY, 0, limit - 1)]


class AsyncBatchClient:
    """Batches over an AsyncChatQueueClient, as BatchClient over a ChatQueueClient."""

    def __init__(self, client: AsyncChatQueueClient) -> None:
        self.client = client
        self.store = AsyncBatchStore(client.redis, result_ttl_s=client.settings.result_ttl_s)

    async def submit(self, path: str | Path, *, window: str = DEFAULT_WINDOW,
                     priority: int = BATCH_PRIORITY, batch_id: str | None = None,
                     metadata: Mapping[str, str] | None = None,
                     stream: bool = False) -> SubmitReport:
        """As BatchClient.submit: every line of the file queued (read a chunk at a time, in a
        thread: never whole in memory, never a blocking read on the event loop)."""
        path = Path(path)
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority {priority}: expected {MIN_PRIORITY}..{MAX_PRIORITY}")
        window_s = parse_window(window)
        if batch_id is None:
            batch_id = batch_id_for_digest(await asyncio.to_thread(file_digest, path))
        elif not valid_batch_id(batch_id):
            raise ValueError(f"batch id {batch_id!r}: expected batch_ then 1-64 of "
                             "[A-Za-z0-9_-]")
        created = await self.store.create(batch_id, window=window, window_s=window_s,
                                          priority=priority, input_file=path.name,
                                          metadata=metadata, now=time.time(), stream=stream,
                                          max_request_bytes=self.client.settings.max_request_bytes)
        record = await self.store.record(batch_id)
        file = await asyncio.to_thread(path.open, "rb")
        try:
            lines, refused = await self.submit_lines(batch_id, _read_lines(file), record)
        finally:
            await asyncio.to_thread(file.close)
        return SubmitReport(batch_id, lines, refused, created)

    async def submit_lines(self, batch_id: str,
                           lines: Iterable[bytes | str] | AsyncIterable[bytes | str],
                           record: Mapping[str, str]) -> tuple[int, int]:
        """As BatchClient.submit_lines; `lines` may be an async iterable."""
        policy = LinePolicy.from_record(batch_id, record,
                                        self.client.settings.max_request_bytes)
        count = refused = 0
        chunk: list[Read] = []
        async for text in _aiter(lines):
            if not text.strip():
                continue  # blank lines (a trailing newline) are no requests
            chunk.append((count, read_line(text, count, policy.max_bytes)))
            count += 1
            if len(chunk) == SUBMIT_CHUNK:
                refused += await self._submit_chunk(policy, chunk)
                chunk = []
        if chunk:
            refused += await self._submit_chunk(policy, chunk)
        if count == 0:
            await self.store.fail(batch_id, "the input file has no request lines")
        else:
            await self.store.finish_submission(batch_id, count)
        return count, refused

    async def _submit_chunk(self, policy: LinePolicy, chunk: list[Read]) -> int:
        unique = await self.store.claim_lines(policy.batch_id, named_lines(chunk))
        plan = plan_chunk(policy, chunk, unique, self.client.queue_for, time.time())
        await self.store.save_lines(policy.batch_id, plan.custom_ids, plan.errors,
                                    policy.window_s)
        await self.client.publish(*plan.jobs)
        return len(plan.errors)

    async def status(self, batch_id: str) -> dict[str, Any]:
        record = await self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        return batch_object(record, time.time())

    async def wait(self, batch_id: str, *, timeout: float | None = None,
                   interval: float = 0.5,
                   on_progress: Callable[[dict[str, Any]], Any] | None = None
                   ) -> dict[str, Any]:
        """Poll until the batch is completed, expired, cancelled or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = await self.status(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch["status"] in _OVER:
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s")
            await asyncio.sleep(interval)

    async def results(self, batch_id: str) -> AsyncIterator[Line]:
        """As BatchClient.results: ("output" | "error", line) for each line that has ended, in
        the input's order, read a chunk at a time."""
        record = await self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        status = batch_status(record, time.time())
        async for _, custom_id, error, meta in self.store.lines(batch_id, lines_known(record)):
            line = result_line(batch_id, custom_id, error, meta, status=status)
            if line is not None:
                yield line

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        """As BatchClient.cancel."""
        record = await self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        if batch_status(record, time.time()) in _OVER:
            return batch_object(record, time.time())  # over already: nothing to cancel
        await self.store.cancel(batch_id, float(record.get("window_s", 0)))
        return await self.status(batch_id)

    async def list(self, limit: int = 100) -> list[dict[str, Any]]:
        out = []
        for batch_id in await self.store.list(limit):
            record = await self.store.record(batch_id)
            if record:
                out.append(batch_object(record, time.time()))
        return out


async def _read_lines(file: IO[bytes], per_read: int = SUBMIT_CHUNK) -> AsyncIterator[bytes]:
    """The file's lines, `per_read` at a time read in a thread."""
    def some() -> list[bytes]:
        return [line for line in (file.readline() for _ in range(per_read)) if line]

    while lines := await asyncio.to_thread(some):
        for line in lines:
            yield line


async def _aiter(lines: Iterable[bytes | str] | AsyncIterable[bytes | str]
                 ) -> AsyncIterator[bytes | str]:
    if isinstance(lines, AsyncIterable):
        async for line in lines:
            yield line
    else:
        for line in lines:
            yield line


__all__ = ["AsyncBatchClient", "AsyncBatchStore"]
