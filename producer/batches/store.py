"""Redis: everything a batch keeps, in one place (the record, its lines, its counts).

The worker counts a line's end in the transaction that stores its result (worker/result_store.py,
with `mark_finished_if_done` from here), so the counts are exact through crashes and
redeliveries.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript, Script
from redis.typing import EncodableT, FieldT

from producer.batches.ids import (
    BATCHES_KEY,
    batch_cancel_key,
    batch_errors_key,
    batch_ids_key,
    batch_key,
    batch_lines_key,
    line_job_id,
)
from producer.settings import CANCEL_CHANNEL

# KEYS: errors hash, record; ARGV: line index, error line. A refused line counts failed once,
# however often its submission is resumed.
_RECORD_LINE_ERROR = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
  return 1
end
return 0
"""


R = TypeVar("R", redis.Redis, aioredis.Redis)
Row = tuple[int, str | None, str | None, Any]  # (index, custom_id, error line JSON, task meta)


class StoreBase(Generic[R]):
    """What a batch store is, on redis' blocking client (BatchStore) or its asyncio one
    (producer.aio_batches.AsyncBatchStore): the two spell the same round trips, and hold the
    same client, script and key lifetime from here."""

    def __init__(self, client: R, *, result_ttl_s: int) -> None:
        self.redis: R = client
        self.result_ttl_s = result_ttl_s
        self._record_line_error: Script | AsyncScript = client.register_script(
            _RECORD_LINE_ERROR)

    def _ttl(self, window_s: float) -> int:
        """A batch's keys outlive its window by the results' TTL."""
        return int(window_s) + self.result_ttl_s


def queue_progress(pipe: Any, batch_id: str, lines: list[tuple[int, str | None]],
                   ttl: int) -> None:
    """Queue on a pipeline (blocking or asyncio: queuing does no I/O) what a saved chunk of
    lines moves on: its keys' lifetime (after the chunk's writes created them), the batch's
    start, and how far the submission has read."""
    for key in (batch_lines_key(batch_id), batch_ids_key(batch_id), batch_errors_key(batch_id)):
        pipe.expire(key, ttl)
    pipe.hsetnx(batch_key(batch_id), "in_progress_at", time.time())
    pipe.hset(batch_key(batch_id), "seen", max(i for i, _ in lines) + 1)


def new_record(*, window: str, window_s: float, priority: int, input_file: str,
               metadata: Mapping[str, str] | None, now: float, stream: bool,
               max_request_bytes: int | None) -> dict[FieldT, EncodableT]:
    """A new batch's record fields (beside its `id`, which claims the record).
    `max_request_bytes`: the byte limit its lines are held to, by this submission and every
    resumed one (plan.LinePolicy), whatever the producer's setting is by then."""
    fields: dict[FieldT, EncodableT] = {
        "completion_window": window, "window_s": window_s, "created_at": now,
        "expires_at": now + window_s, "priority": priority, "input_file": input_file,
        "metadata": json.dumps(dict(metadata or {})), "completed": 0, "failed": 0,
        "stream": int(stream),
    }
    if max_request_bytes is not None:
        fields["max_request_bytes"] = max_request_bytes
    return fields


def queued_job_ids(batch_id: str, custom_ids: Sequence[Any],
                   errors: Sequence[Any]) -> list[str | None]:
    """The job id of each line of a chunk that was queued (a custom_id and no error line)."""
    return [line_job_id(batch_id, as_text(c)) if c and e is None else None
            for c, e in zip(custom_ids, errors, strict=True)]


def chunk_rows(indexes: Sequence[int], custom_ids: Sequence[Any], errors: Sequence[Any],
               job_ids: Sequence[str | None], metas: Sequence[Any]) -> Iterator[Row]:
    """A chunk's rows from its reads; `metas`: the task metas of its queued lines, in order."""
    queued = iter(metas)
    for index, custom_id, error, job_id in zip(indexes, custom_ids, errors, job_ids,
                                               strict=True):
        meta = next(queued) if job_id is not None else None
        yield (index, as_text(custom_id) if custom_id else None, as_text(error) if error else None,
               json.loads(meta) if meta else None)


class BatchStore(StoreBase[redis.Redis]):
    _record_line_error: Script  # what the blocking client registers

    def create(self, batch_id: str, *, window: str, window_s: float, priority: int,
               input_file: str, metadata: Mapping[str, str] | None, now: float,
               stream: bool = False, max_request_bytes: int | None = None) -> bool:
        """Write a new batch's record; False (nothing written) if the batch exists: a
        resumed submission keeps the first one's window, priority and byte limit."""
        key = batch_key(batch_id)
        if not self.redis.hsetnx(key, "id", batch_id):
            return False
        self.redis.hset(key, mapping=new_record(
            window=window, window_s=window_s, priority=priority,
            input_file=input_file, metadata=metadata, now=now, stream=stream,
            max_request_bytes=max_request_bytes))
        self.redis.expire(key, self._ttl(window_s))
        self.redis.zadd(BATCHES_KEY, {batch_id: now})
        return True

    def record(self, batch_id: str) -> dict[str, str]:
        raw: dict[bytes, bytes] = self.redis.hgetall(batch_key(batch_id))  # type: ignore[assignment]
        return {key.decode(): value.decode() for key, value in raw.items()}

    def claim_lines(self, batch_id: str, lines: list[tuple[int, str]]) -> list[bool]:
        """Index each (line index, custom_id); False for a line whose custom_id an earlier line
        of the file holds (a resumed submission's own lines stay True)."""
        ids = batch_ids_key(batch_id)
        with self.redis.pipeline(transaction=False) as pipe:
            for index, custom_id in lines:
                pipe.hsetnx(ids, custom_id, index)
            fresh = pipe.execute()
        with self.redis.pipeline(transaction=False) as pipe:
            for (_, custom_id), new in zip(lines, fresh, strict=True):
                if not new:
                    pipe.hget(ids, custom_id)
            owners = iter(pipe.execute())
        return [bool(new) or int(next(owners)) == index
                for (index, _), new in zip(lines, fresh, strict=True)]

    def save_lines(self, batch_id: str, lines: list[tuple[int, str | None]],
                   errors: list[tuple[int, dict[str, Any]]], window_s: float) -> None:
        """The lines' custom_ids by index and the refused lines' error lines (counted failed
        once each)."""
        ttl = self._ttl(window_s)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(batch_lines_key(batch_id),
                      mapping={index: custom_id or "" for index, custom_id in lines})
            for index, line in errors:
                self._record_line_error(keys=[batch_errors_key(batch_id), batch_key(batch_id)],
                                        args=[index, json.dumps(line)], client=pipe)
            queue_progress(pipe, batch_id, lines, ttl)
            pipe.execute()

    def finish_submission(self, batch_id: str, total: int) -> None:
        self.redis.hset(batch_key(batch_id), mapping={"total": total, "seen": total})
        mark_finished_if_done(self.redis, batch_id)

    def fail(self, batch_id: str, reason: str) -> None:
        self.redis.hset(batch_key(batch_id), mapping={"failed_at": time.time(), "errors": reason})

    def cancel(self, batch_id: str, window_s: float) -> None:
        self.redis.set(batch_cancel_key(batch_id), 1, ex=self._ttl(window_s))
        self.redis.hsetnx(batch_key(batch_id), "cancelling_at", time.time())
        # Running lines: every worker's cancel listener takes a batch id for all its lines.
        self.redis.publish(CANCEL_CHANNEL, batch_id)
        mark_finished_if_done(self.redis, batch_id)

    def lines(self, batch_id: str, total: int, chunk: int = 500) -> Iterator[Row]:
        """(index, custom_id, error line JSON or None, task meta or None) for each line, in the
        input's order."""
        for start in range(0, total, chunk):
            indexes = list(range(start, min(total, start + chunk)))
            custom_ids = self.redis.hmget(batch_lines_key(batch_id), indexes)
            errors = self.redis.hmget(batch_errors_key(batch_id), indexes)
            job_ids = queued_job_ids(batch_id, custom_ids, errors)
            wanted = [task_meta(job_id) for job_id in job_ids if job_id is not None]
            metas = self.redis.mget(wanted) if wanted else []
            yield from chunk_rows(indexes, custom_ids, errors, job_ids, metas)

    def list(self, limit: int = 100) -> list[str]:
        ids = self.redis.zrevrange(BATCHES_KEY, 0, limit - 1)
        return [as_text(i) for i in ids]


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def task_meta(job_id: str) -> str:
    return f"celery-task-meta-{job_id}"


def mark_finished_if_done(client: Any, batch_id: str) -> None:
    """Stamp the batch's end once every line of a fully submitted batch has ended (the worker
    storing the last result, or the submission that learns the total last)."""
    total, completed, failed = client.hmget(batch_key(batch_id), "total", "completed", "failed")
    if total and int(completed or 0) + int(failed or 0) >= int(total):
        client.hsetnx(batch_key(batch_id), "finished_at", time.time())
