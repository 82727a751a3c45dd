"""How a chunk of a batch's lines is published (pure: no I/O): which lines run as which jobs,
and which end at once as error lines.

A driver (the blocking BatchClient, or an asyncio twin) reads each line with `read_line`,
claims the chunk's custom_ids in Redis (`BatchStore.claim_lines` over `named_lines`), calls
`plan_chunk`, saves the plan's bookkeeping and publishes its jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.batches.ids import line_job_id
from producer.batches.lines import InputLine, LineError, check_size, map_body
from producer.batches.outputs import error_line, request_line_id
from producer.core import Submission
from producer.schemas import BatchLine, ChatRequest

Read = tuple[int, InputLine | LineError]  # (line index, what read_line made of it)


@dataclass(frozen=True)
class LinePolicy:
    """What holds for every line of a batch. Taken from the batch's stored record, so a resumed
    submission publishes the very requests the first one did, and refuses the very lines it
    refused: never a line both queued and refused, whatever the producer's settings are now."""

    batch_id: str
    window_s: float
    expires_at: float
    priority: int
    stream: bool
    max_bytes: int  # max_request_bytes at the batch's creation: a line is held to a request's

    @classmethod
    def from_record(cls, batch_id: str, record: Mapping[str, str],
                    max_bytes: int) -> LinePolicy:
        """`max_bytes`: the producer's limit now, for a record that names none (written before
        records kept theirs, or by a caller of `create` that gave none)."""
        return cls(batch_id=batch_id, window_s=float(record["window_s"]),
                   expires_at=float(record["expires_at"]), priority=int(record["priority"]),
                   stream=record.get("stream") == "1",
                   max_bytes=int(record.get("max_request_bytes") or max_bytes))


@dataclass
class ChunkPlan:
    custom_ids: list[tuple[int, str | None]] = field(default_factory=list)  # every line
    errors: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # refused lines
    jobs: list[Submission] = field(default_factory=list)  # lines to publish


def named_lines(chunk: Sequence[Read]) -> list[tuple[int, str]]:
    """(index, custom_id) of the lines that read well: the custom_ids to claim."""
    return [(index, item.custom_id) for index, item in chunk if isinstance(item, InputLine)]


def plan_chunk(policy: LinePolicy, chunk: Sequence[Read], unique: Sequence[bool],
               queue_for: Callable[[ChatRequest], str], now: float) -> ChunkPlan:
    """`unique`: the claim of each of `named_lines(chunk)`, in order (False: an earlier line
    of the file holds the custom_id)."""
    claimed = dict(zip(named_lines(chunk), unique, strict=True))
    plan = ChunkPlan()
    for index, item in chunk:
        if isinstance(item, LineError):
            refused = error_line(item.custom_id, None, item)
            # Not the custom_id's hash: a refused line may have none, or share one.
            refused["id"] = request_line_id(f"{policy.batch_id}#{index}")
            plan.errors.append((index, refused))
            plan.custom_ids.append((index, None))
            continue
        plan.custom_ids.append((index, item.custom_id))
        job_id = line_job_id(policy.batch_id, item.custom_id)
        if not claimed[(index, item.custom_id)]:
            plan.errors.append((index, error_line(item.custom_id, None, LineError(
                f"custom_id {item.custom_id!r} is used by an earlier line of the file",
                param="custom_id"))))
            continue
        try:
            request = map_body(item.body, job_id=job_id, priority=policy.priority)
            dumped = request.model_dump(mode="json")
            # As published, defaults included: what the worker measures.
            check_size(dumped, policy.max_bytes, custom_id=item.custom_id)
        except LineError as exc:
            plan.errors.append((index, error_line(item.custom_id, job_id, exc)))
            continue
        line = BatchLine(batch_id=policy.batch_id, custom_id=item.custom_id,
                         expires_at=policy.expires_at, stream=policy.stream)
        plan.jobs.append(Submission(
            job_id=job_id,
            kwargs={"request": dumped, "submitted_at": now,
                    "batch": line.model_dump(mode="json")},
            queue=queue_for(request)))
    return plan
