"""The asyncio twin of `BatchClient`: submit a Batch JSONL file, follow it, read its results,
cancel it, list batches -- on an `AsyncChatQueueClient`, with no call run in a thread but the
file reads and the publishes (which go through the synchronous client's one publish path, as
AsyncChatQueueClient.submit does).

What a batch means -- ids and keys, how a line reads, how a chunk is planned, how a record
reads as OpenAI's Batch object, how a result reads as an output line -- is producer.batches'
pure functions, shared with the blocking client. Only the Redis round trips are spelled here,
command for command those of `producer.batches.store.BatchStore`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any, Literal

import redis.asyncio as aioredis

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
    line_from_meta,
    line_job_id,
    named_lines,
    parse_window,
    plan_chunk,
    read_line,
    task_meta,
    valid_batch_id,
)
from producer.batches.plan import Read
from producer.batches.store import _RECORD_LINE_ERROR  # one script for both stores
from producer.schemas import BATCH_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from producer.settings import CANCEL_CHANNEL

_OVER = ("completed", "expired", "cancelled", "failed")
Line = tuple[Literal["output", "error"], dict[str, Any]]


class AsyncBatchStore:
    """BatchStore's reads and writes on redis' asyncio client."""

    def __init__(self, client: aioredis.Redis, *, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._record_line_error = client.register_script(_RECORD_LINE_ERROR)

    def _ttl(self, window_s: float) -> int:
        return int(window_s) + self.result_ttl_s

    async def create(self, batch_id: str, *, window: str, window_s: float, priority: int,
                     input_file: str, metadata: Mapping[str, str] | None, now: float,
                     stream: bool = False) -> bool:
        key = batch_key(batch_id)
        if not await self.redis.hsetnx(key, "id", batch_id):
            return False
        await self.redis.hset(key, mapping={
            "completion_window": window, "window_s": window_s, "created_at": now,
            "expires_at": now + window_s, "priority": priority, "input_file": input_file,
            "metadata": json.dumps(dict(metadata or {})), "completed": 0, "failed": 0,
            "stream": int(stream),
        })
        await self.redis.expire(key, self._ttl(window_s))
        await self.redis.zadd(BATCHES_KEY, {batch_id: now})
        return True

    async def record(self, batch_id: str) -> dict[str, str]:
        raw = await self.redis.hgetall(batch_key(batch_id))
        return {_str(key): _str(value) for key, value in raw.items()}

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
            for key in (batch_lines_key(batch_id), batch_ids_key(batch_id),
                        batch_errors_key(batch_id)):
                pipe.expire(key, ttl)
            pipe.hsetnx(batch_key(batch_id), "in_progress_at", time.time())
            pipe.hset(batch_key(batch_id), "seen", max(i for i, _ in lines) + 1)
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

    async def lines(self, batch_id: str, total: int, chunk: int = 500
                    ) -> AsyncIterator[tuple[int, str | None, str | None, Any]]:
        for start in range(0, total, chunk):
            indexes = list(range(start, min(total, start + chunk)))
            custom_ids = await self.redis.hmget(batch_lines_key(batch_id), indexes)
            errors = await self.redis.hmget(batch_errors_key(batch_id), indexes)
            job_ids = [line_job_id(batch_id, _str(c)) if c and e is None else None
                       for c, e in zip(custom_ids, errors, strict=True)]
            wanted = [task_meta(job_id) for job_id in job_ids if job_id is not None]
            metas = iter(await self.redis.mget(wanted) if wanted else [])
            for index, custom_id, error, job_id in zip(indexes, custom_ids, errors, job_ids,
                                                       strict=True):
                meta = next(metas) if job_id is not None else None
                yield (index, _str(custom_id) if custom_id else None,
                       _str(error) if error else None,
                       json.loads(meta) if meta else None)

    async def list(self, limit: int = 100) -> list[str]:
        return [_str(i) for i in await self.redis.zrevrange(BATCHES_KEY, 0, limit - 1)]


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
            batch_id = batch_id_for_digest(await asyncio.to_thread(_file_digest, path))
        elif not valid_batch_id(batch_id):
            raise ValueError(f"batch id {batch_id!r}: expected batch_ then 1-64 of "
                             "[A-Za-z0-9_-]")
        created = await self.store.create(batch_id, window=window, window_s=window_s,
                                          priority=priority, input_file=path.name,
                                          metadata=metadata, now=time.time(), stream=stream)
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
        total = int(record.get("total") or record.get("seen") or 0)
        async for _, custom_id, error, meta in self.store.lines(batch_id, total):
            if error is not None:
                yield "error", json.loads(error)
                continue
            if custom_id is None:
                continue  # an index the submission had not reached
            line = line_from_meta(custom_id, line_job_id(batch_id, custom_id), meta,
                                  status=status)
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


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


__all__ = ["AsyncBatchClient", "AsyncBatchStore"]
