"""What the producer's calls mean, without I/O: request parsing, the job record, the cancel
script, result and progress interpretation, the stream reader's cursor. `ChatQueueClient`
(blocking) and `AsyncChatQueueClient` (asyncio) are thin drivers of these, so both clients keep
one contract, one set of errors and one set of guarantees."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from producer.errors import JobFailed, JobIdConflict, JobNotFound
from producer.schemas import (
    ChatRequest,
    ChatResult,
    JobError,
    Progress,
    StreamEvent,
    error_from_validation,
    request_size,
    request_too_large,
)
from producer.settings import ProducerSettings

# Celery's states, spelled here so the interpretation needs no Celery import.
PENDING, SUCCESS, FAILURE, REVOKED = "PENDING", "SUCCESS", "FAILURE", "REVOKED"
PROGRESS = "PROGRESS"
READY_STATES = frozenset({SUCCESS, FAILURE, REVOKED})

# While Redis restarts, the stream reader waits this long between attempts to reconnect.
RECONNECT_WAIT_S = 0.5
# One XREAD blocks this long and returns at most this many entries.
STREAM_BLOCK_MS = 1000
STREAM_COUNT = 500

# KEYS: job record, cancel key; ARGV: ttl, channel, job id. 0 when no such job.
CANCEL_IF_KNOWN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], 1, 'EX', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""


# Publishes jobs as record_verdict and the synchronous client do -- claim each job's record
# (job_record), push its message, mark it queued -- but all of them in one script, so nothing
# is ever half done: a job is queued with its record "queued", or not touched. A job whose
# record holds another request's digest is a conflict, and the jobs after it in its call are
# not published (as one by one). Run again after a lost reply, it finds its jobs queued: it
# queues nothing twice. Only the records are declared keys; the lists come in ARGV, as the
# producer's ACL grants LPUSH on queues to its own selector (deploy/redis/acl.sh).
# KEYS: each job's record; ARGV: ttl, then per job: digest, call number, list, message.
# Returns per job: 1 queued now, 0 already there, -1 conflict, -2 after a conflict in its call.
PUBLISH_JOBS = """
local ttl = ARGV[1]
local refused = {}
local out = {}
for i, record in ipairs(KEYS) do
  local at = 2 + (i - 1) * 4
  local digest, call, list, message = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local verdict = 1
  if refused[call] then
    verdict = -2
  else
    local current = redis.call('GET', record)
    if current then
      local space = string.find(current, ' ', 1, true)
      local state, stored = current, ''
      if space then
        state, stored = string.sub(current, 1, space - 1), string.sub(current, space + 1)
      end
      if stored ~= '' and stored ~= digest then
        verdict = -1
        refused[call] = true
      elseif state ~= 'pending' then
        verdict = 0
      end
    end
  end
  if verdict == 1 then
    redis.call('LPUSH', list, message)
    if redis.call('SET', record, 'queued ' .. digest, 'XX', 'KEEPTTL') == false then
      redis.call('SET', record, 'queued ' .. digest, 'EX', ttl)
    end
  end
  out[i] = verdict
end
return out
"""
# Verdicts of PUBLISH_JOBS.
PUBLISHED, ALREADY_THERE, CONFLICT, AFTER_CONFLICT = 1, 0, -1, -2

def task_meta_key(job_id: str) -> str:
    """Where Celery's Redis result backend keeps a job's state and result (and the pub/sub
    channel it announces every write on)."""
    return f"celery-task-meta-{job_id}"


def parse_request(raw: ChatRequest | Mapping[str, Any], max_bytes: int | None = None, *,
                  whose: str = "the producer's") -> ChatRequest:
    """A request as the contract reads it; a bad one raises JobFailed whose JobError names the
    field, the limit and the value given. The producer and the worker both read requests here,
    so a client gets the error a worker would store. With `max_bytes`, the size as JSON is
    checked before anything parses it (`whose` limit it is, for the message)."""
    if isinstance(raw, ChatRequest):
        return raw
    if max_bytes is not None:
        check_request_size(raw, max_bytes, whose)
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise JobFailed(error_from_validation(exc)) from None


def request_digest(args: Any, kwargs: Any) -> str:
    """What makes two publishes of a job id the same request: its arguments, less the time it
    was submitted at, as canonical JSON."""
    request = {key: value for key, value in kwargs.items() if key != "submitted_at"} \
        if isinstance(kwargs, Mapping) else kwargs
    text = json.dumps([list(args or ()), request], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Submission:
    """One job as it is published: its id, the task's keyword arguments and its queue."""

    job_id: str
    kwargs: dict[str, Any]
    queue: str


def plan_submission(raw: ChatRequest | Mapping[str, Any], settings: ProducerSettings,
                    now: float | None = None) -> Submission:
    """Validate a request (JobFailed when bad: nothing is queued) and say how it is published:
    the client's job id or a new one; the queue of the model it names.

    A request over settings.max_request_bytes as JSON is refused before it is parsed (a mapping)
    and as published (its dump, defaults included), the same error a worker would store."""
    limit = settings.max_request_bytes
    if not isinstance(raw, ChatRequest):
        check_request_size(raw, limit)
    request = parse_request(raw)
    dumped = request.model_dump(mode="json")
    check_request_size(dumped, limit)
    return Submission(
        job_id=request.job_id or uuid.uuid4().hex,
        kwargs={"request": dumped,
                "submitted_at": time.time() if now is None else now},
        queue=settings.queue_for(request.model or settings.default_model),
    )


def check_request_size(raw: Any, limit: int, whose: str = "the producer's") -> None:
    """JobFailed (limit_exceeded, field "request") when `raw` is over `limit` bytes as JSON."""
    size = request_size(raw)
    if size > limit:
        raise JobFailed(request_too_large(size, limit, whose))


def job_record(state: Literal["pending", "queued"], digest: str) -> str:
    """A job record's value (`accepted_key`): "pending" from its claim until its message is
    in the queue, then "queued" (the worker moves it on); the request's digest."""
    return f"{state} {digest}"


def record_verdict(current: bytes | str | None, digest: str,
                   job_id: str) -> Literal["claim", "publish", "exists"]:
    """What a publish does, given the job record that SET NX found ("<state> <digest>"):
    claim it (it expired just now), publish (an earlier publish raised: it may not have
    reached the queue), or nothing (queued, running or finished). A different request under
    the id raises JobIdConflict."""
    if current is None:
        return "claim"
    text = current.decode() if isinstance(current, bytes) else str(current)
    state, _, stored = text.partition(" ")
    if stored and stored != digest:
        raise JobIdConflict(job_id)
    return "publish" if state == "pending" else "exists"


def not_found(job_id: str, settings: ProducerSettings) -> JobNotFound:
    return JobNotFound(
        f"job {job_id}: no such job, or it ended more than result_ttl_s "
        f"({settings.result_ttl_s} s) ago and its result expired"
    )


def as_job_failed(job_id: str, payload: object) -> JobFailed:
    if isinstance(payload, JobFailed):
        return payload
    # A failure that is not ours (a crash, a Celery error) still reaches the caller typed.
    return JobFailed(JobError(code="internal_error", message=f"job {job_id} failed: {payload!r}"))


def finished_result(job_id: str, state: str, payload: object) -> ChatResult:
    """A finished job's result; raises JobFailed for any other final state."""
    if state == SUCCESS:
        return ChatResult.model_validate(payload)
    raise as_job_failed(job_id, payload)


def progress_from(state: str, info: object) -> Progress | None:
    """Tokens so far and phase while the job runs; None before it starts or once it ended."""
    if state != PROGRESS or not isinstance(info, dict):
        return None
    return Progress.model_validate(info)


def timeout_error(job_id: str, timeout: float | None) -> TimeoutError:
    return TimeoutError(f"job {job_id} did not finish within {timeout}s")


@dataclass
class StreamCursor:
    """A job stream reader's state: where it is, when it last heard anything, and whether the
    end event came. The driver XREADs `key` from `last_id` and feeds each reply in."""

    job_id: str
    key: str
    wait_s: float
    last_id: str = "0-0"
    done: bool = False
    quiet_since: float = field(default_factory=time.monotonic)

    def feed(self, reply: Any, now: float | None = None) -> list[StreamEvent]:
        """The events of one XREAD reply (RESP2: [[key, [(entry id, {field: value}), ...]]] or
        None), up to and including the end event. Raises TimeoutError once nothing came for
        `wait_s` seconds."""
        now = time.monotonic() if now is None else now
        if not reply:
            if now - self.quiet_since > self.wait_s:
                raise TimeoutError(f"no stream events for job {self.job_id} in {self.wait_s}s")
            return []
        self.quiet_since = now
        events: list[StreamEvent] = []
        for entry_id, fields in reply[0][1]:
            self.last_id = _text(entry_id)
            event = StreamEvent.model_validate(
                {_text(key): _text(value) for key, value in fields.items()})
            events.append(event)
            if event.type == "end":
                self.done = True
                break
        return events


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
