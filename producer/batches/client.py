"""BatchClient: submit a file, follow it, read its results, cancel it -- over a
ChatQueueClient (publishing is the client's) and a BatchStore."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer.batches.ids import (
    DEFAULT_WINDOW,
    batch_id_for_digest,
    parse_window,
    valid_batch_id,
)
from producer.batches.lifecycle import batch_object, batch_status, lines_known
from producer.batches.lines import read_line
from producer.batches.outputs import Line, result_line
from producer.batches.plan import LinePolicy, Read, named_lines, plan_chunk
from producer.batches.store import BatchStore
from producer.schemas import BATCH_PRIORITY, MAX_PRIORITY, MIN_PRIORITY

if TYPE_CHECKING:
    from producer.client import ChatQueueClient

SUBMIT_CHUNK = 256  # lines per round of Redis bookkeeping


@dataclass(frozen=True)
class SubmitReport:
    batch_id: str
    lines: int
    refused: int
    created: bool


class BatchClient:
    """Batches over a ChatQueueClient: submit a file, follow it, read its results, cancel it."""

    def __init__(self, client: ChatQueueClient) -> None:
        self.client = client
        self.store = BatchStore(client._redis, result_ttl_s=client.settings.result_ttl_s)

    def submit(self, path: str | Path, *, window: str = DEFAULT_WINDOW,
               priority: int = BATCH_PRIORITY, batch_id: str | None = None,
               metadata: Mapping[str, str] | None = None, stream: bool = False) -> SubmitReport:
        """Queue every line of a Batch JSONL file, read line by line (never whole in memory).

        Without `batch_id` the batch's id is the file's content digest: submitting the same
        file again resumes it (each line queued exactly once, with the first submission's
        window, priority, `stream` and byte limit). Refused lines become error lines
        at once; the rest of the file runs."""
        path = Path(path)
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority {priority}: expected {MIN_PRIORITY}..{MAX_PRIORITY}")
        window_s = parse_window(window)
        if batch_id is None:
            batch_id = batch_id_for_digest(file_digest(path))
        elif not valid_batch_id(batch_id):
            raise ValueError(f"batch id {batch_id!r}: expected batch_ then 1-64 of "
                             "[A-Za-z0-9_-]")
        created = self.store.create(batch_id, window=window, window_s=window_s,
                                    priority=priority, input_file=path.name, metadata=metadata,
                                    now=time.time(), stream=stream,
                                    max_request_bytes=self.client.settings.max_request_bytes)
        record = self.store.record(batch_id)
        with path.open("rb") as file:
            lines, refused = self.submit_lines(batch_id, file, record)
        return SubmitReport(batch_id, lines, refused, created)

    def submit_lines(self, batch_id: str, lines: Iterable[bytes | str],
                     record: Mapping[str, str]) -> tuple[int, int]:
        """Queue the lines of an existing batch record, chunk by chunk; (lines, refused). The
        record's window, priority and stream choice hold for every line, so a resumed
        submission publishes the very requests the first one did."""
        policy = LinePolicy.from_record(batch_id, record,
                                        self.client.settings.max_request_bytes)
        count = refused = 0
        chunk: list[Read] = []
        for text in lines:
            if not text.strip():
                continue  # blank lines (a trailing newline) are no requests
            # Read now: a line over the byte limit is kept as its error, never as its body.
            chunk.append((count, read_line(text, count, policy.max_bytes)))
            count += 1
            if len(chunk) == SUBMIT_CHUNK:
                refused += self._submit_chunk(policy, chunk)
                chunk = []
        if chunk:
            refused += self._submit_chunk(policy, chunk)
        if count == 0:
            self.store.fail(batch_id, "the input file has no request lines")
        else:
            self.store.finish_submission(batch_id, count)
        return count, refused

    def _submit_chunk(self, policy: LinePolicy, chunk: list[Read]) -> int:
        unique = self.store.claim_lines(policy.batch_id, named_lines(chunk))
        plan = plan_chunk(policy, chunk, unique, self.client.queue_for, time.time())
        self.store.save_lines(policy.batch_id, plan.custom_ids, plan.errors, policy.window_s)
        for job in plan.jobs:
            self.client.publish(job)
        return len(plan.errors)

    def status(self, batch_id: str) -> dict[str, Any]:
        record = self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        return batch_object(record, time.time())

    def wait(self, batch_id: str, *, timeout: float | None = None, interval: float = 0.5,
             on_progress: Any = None) -> dict[str, Any]:
        """Poll until the batch is completed, expired, cancelled or failed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self.status(batch_id)
            if on_progress is not None:
                on_progress(batch)
            if batch["status"] in ("completed", "expired", "cancelled", "failed"):
                return batch
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"batch {batch_id} still {batch['status']} after {timeout}s")
            time.sleep(interval)

    def results(self, batch_id: str) -> Iterator[Line]:
        """("output" | "error", line) for each line that has ended, in the input's order; a
        batch expired or cancelled gives its unstarted lines as batch_expired /
        batch_cancelled errors. Lines still running are left out."""
        record = self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        status = batch_status(record, time.time())
        for _, custom_id, error, meta in self.store.lines(batch_id, lines_known(record)):
            line = result_line(batch_id, custom_id, error, meta, status=status)
            if line is not None:
                yield line

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Cancel a batch: lines not started never start; running ones end within a decode
        step (the worker's cancel listener takes a batch id for all its lines); finished ones
        stay."""
        record = self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        if batch_status(record, time.time()) in ("completed", "expired", "failed", "cancelled"):
            return batch_object(record, time.time())  # over already: nothing to cancel
        self.store.cancel(batch_id, float(record.get("window_s", 0)))
        return self.status(batch_id)

    def list(self, limit: int = 100) -> list[dict[str, Any]]:
        out = []
        for batch_id in self.store.list(limit):
            record = self.store.record(batch_id)
            if record:
                out.append(batch_object(record, time.time()))
        return out


def file_digest(path: Path) -> str:
    """The file's SHA-256, read a MiB at a time: a batch's default id."""
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
