"""OpenAI Batch files in, results out: a file of chat requests run as one batch of jobs.

Three layers, so that the blocking CLI, the Python API and an asyncio gateway share one logic:

- pure functions: a JSONL line -> a `ChatRequest` or a 400-shaped `LineError` (`parse_line`,
  `map_body`), a result or error -> an output / error line (`output_line`, `error_line`), a
  stored record -> OpenAI's Batch object (`batch_object`, `batch_status`);
- Redis access in one place, `BatchStore` (the batch record, its lines, its counts);
- `BatchClient`, which drives them with a `ChatQueueClient` (publishing is the client's).

Keys (all under `chatqueue:batch:<id>`, living for the window plus result_ttl_s):
  <id>          hash: the record (lifecycle timestamps, window, counts completed/failed, total)
  <id>:lines    hash: line index -> custom_id (the input's order; a resumed submission rewrites
                the same fields)
  <id>:ids      hash: custom_id -> line index (a custom_id seen twice fails its second line)
  <id>:errors   hash: line index -> error line of a line refused before it was queued
  <id>:cancel   set once the batch is cancelled: its lines not yet started never start

A line's job id is derived from the batch id and its custom_id (`line_job_id`), and a job id
names one request (ChatQueueClient.publish): a submission killed halfway and run again queues
each line exactly once. The worker counts a line's end in the transaction that stores its
result (worker/delivery.py), so the counts are exact through crashes and redeliveries.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import redis
from pydantic import ValidationError

from producer.schemas import (
    BATCH_PRIORITY,
    MAX_PRIORITY,
    MIN_PRIORITY,
    BatchLine,
    ChatRequest,
    ChatResult,
    JobError,
    error_from_validation,
)
from producer.settings import CANCEL_CHANNEL

if TYPE_CHECKING:
    from producer.client import ChatQueueClient

ENDPOINT = "/v1/chat/completions"
DEFAULT_WINDOW = "24h"
BATCH_PREFIX = "batch_"
LINE_SEP = "."  # line job id = <batch id>.<digest of custom_id>
BATCHES_KEY = "chatqueue:batches"  # sorted set: batch id -> created_at
MAX_CUSTOM_ID_CHARS = 512
_BATCH_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,64}$")
_WINDOW = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}
SUBMIT_CHUNK = 256

Status = Literal["validating", "failed", "in_progress", "finalizing", "completed", "expired",
                 "cancelling", "cancelled"]
Outcome = Literal["completed", "failed"]


# --- ids and keys

def batch_key(batch_id: str) -> str:
    """The batch record (a hash): OpenAI's lifecycle fields and the request counts."""
    return f"chatqueue:batch:{batch_id}"


def batch_lines_key(batch_id: str) -> str:
    return f"chatqueue:batch:{batch_id}:lines"


def batch_ids_key(batch_id: str) -> str:
    return f"chatqueue:batch:{batch_id}:ids"


def batch_errors_key(batch_id: str) -> str:
    return f"chatqueue:batch:{batch_id}:errors"


def batch_cancel_key(batch_id: str) -> str:
    """Set when the batch is cancelled: its lines not yet started never start."""
    return f"chatqueue:batch:{batch_id}:cancel"


def valid_batch_id(batch_id: str) -> bool:
    return bool(_BATCH_ID.fullmatch(batch_id))


def batch_id_for_digest(digest: str) -> str:
    """A file's batch id: its content's digest, so submitting the same file again resumes it."""
    return f"{BATCH_PREFIX}{digest[:32]}"


def line_job_id(batch_id: str, custom_id: str) -> str:
    digest = hashlib.sha256(custom_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return f"{batch_id}{LINE_SEP}{digest}"


def batch_of_job(job_id: str) -> str | None:
    """The batch a line's job id belongs to, or None for a job of no batch."""
    if not job_id.startswith(BATCH_PREFIX):
        return None
    batch_id, sep, _ = job_id.rpartition(LINE_SEP)
    return batch_id if sep and valid_batch_id(batch_id) else None


def parse_window(text: str) -> float:
    """A completion window as seconds: "24h", "90m", "2d", "3600s" or "3600"."""
    match = _WINDOW.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"completion window {text!r}: expected a positive duration such as "
                         "24h, 90m, 2d or 3600s")
    return float(match.group(1)) * _UNITS[match.group(2)]


# --- parsing and mapping (pure)

class LineError(Exception):
    """A line that cannot run as given: OpenAI's 400 (or the error code, for a line that never
    got a response). The rest of the file runs."""

    def __init__(self, message: str, *, param: str | None = None,
                 code: str = "invalid_request", status_code: int = 400,
                 custom_id: str | None = None, limit: int | float | str | None = None,
                 value: int | float | str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.status_code, self.custom_id = status_code, custom_id
        # What the contract's JobError says of a refused value (the gateway's 400 carries them).
        self.limit, self.value = limit, value


@dataclass(frozen=True)
class InputLine:
    index: int
    custom_id: str
    body: Mapping[str, Any]


def parse_line(text: str | bytes, index: int) -> InputLine:
    """One JSONL line as OpenAI's Batch input defines it; LineError naming the field if not."""
    try:
        raw = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LineError(f"line {index + 1}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise LineError(f"line {index + 1}: expected a JSON object")
    custom_id = raw.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_CHARS:
        raise LineError(f"line {index + 1}: custom_id must be a non-empty string of at most "
                        f"{MAX_CUSTOM_ID_CHARS} characters", param="custom_id")
    unknown = sorted(set(raw) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise LineError(f"unknown field {unknown[0]!r}", param=unknown[0], custom_id=custom_id)
    if raw.get("method", "POST") != "POST":
        raise LineError("method must be POST", param="method", custom_id=custom_id)
    if raw.get("url", ENDPOINT) != ENDPOINT:
        raise LineError(f"url must be {ENDPOINT} (the only endpoint served)", param="url",
                        custom_id=custom_id)
    body = raw.get("body")
    if not isinstance(body, dict):
        raise LineError("body must be a JSON object", param="body", custom_id=custom_id)
    return InputLine(index=index, custom_id=custom_id, body=body)




def _neutral(name: str, value: Any) -> bool:
    """Fields accepted only at their neutral value (what else they ask, the product cannot do)."""
    if name == "n":
        return type(value) is int and value == 1
    if name in ("stream", "logprobs"):
        return value is False
    if name in ("presence_penalty", "frequency_penalty"):
        return type(value) in (int, float) and value == 0
    return name == "parallel_tool_calls" and isinstance(value, bool)

_IGNORED = frozenset({"user", "store", "metadata"})
_MAPPED = frozenset({"model", "messages", "max_completion_tokens", "max_tokens", "temperature",
                     "top_p", "top_k", "seed", "stop", "chat_template_kwargs",
                     "thinking_token_budget", "priority", "ignore_eos"})


def map_body(body: Mapping[str, Any], *, job_id: str | None = None,
             priority: int = BATCH_PRIORITY) -> ChatRequest:
    """A chat.completions request body as the job contract: LineError (400) naming the first
    field that the product cannot honour or that breaks the contract.

    `priority` is the batch's; a body's own `priority` (0-9, higher first) overrides it."""
    for name in sorted(body):
        value = body[name]
        if name in _MAPPED or name in _IGNORED or value is None:
            continue
        if _neutral(name, value):
            continue
        raise LineError(f"{name}: not supported by this server (got {_short(value)})",
                        param=name)
    params: dict[str, Any] = {}
    max_new = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_new is not None:
        params["max_new_tokens"] = max_new
    temperature = body.get("temperature")
    if temperature is not None:
        if temperature == 0 and not isinstance(temperature, bool):
            params["do_sample"] = False  # OpenAI's temperature 0: greedy
        else:
            params["temperature"] = temperature
    for source, target in (("top_p", "top_p"), ("top_k", "top_k"), ("seed", "seed"),
                           ("thinking_token_budget", "max_thinking_tokens"),
                           ("ignore_eos", "ignore_eos")):  # vLLM's extra parameter
        if body.get(source) is not None:
            params[target] = body[source]
    stop = body.get("stop")
    if stop is not None:
        params["stop"] = [stop] if isinstance(stop, str) else stop
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise LineError("chat_template_kwargs must be an object", param="chat_template_kwargs")
        for key, value in kwargs.items():
            if key != "enable_thinking":
                raise LineError(f"chat_template_kwargs.{key}: not supported by this server",
                                param=f"chat_template_kwargs.{key}")
            params["enable_thinking"] = value
    raw: dict[str, Any] = {
        "messages": _messages(body.get("messages")),
        "params": params,
        "priority": body["priority"] if body.get("priority") is not None else priority,
    }
    if body.get("model") is not None:
        raw["model"] = body["model"]
    if job_id is not None:
        raw["job_id"] = job_id
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        error = error_from_validation(exc)
        param = _body_field(error.field)
        if param == "max_completion_tokens" and "max_completion_tokens" not in body:
            param = "max_tokens"
        # The message names the field as the body spells it, not as the contract does.
        message = error.message
        if param is not None and error.field is not None:
            message = message.replace(f"{error.field}: ", f"{param}: ", 1)
        raise LineError(message, param=param, limit=error.limit, value=error.value) from None


def _messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise LineError("messages must be a list", param="messages")
    mapped = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise LineError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise LineError(f"messages[{i}].{extra[0]}: not supported by this server",
                            param=f"messages[{i}].{extra[0]}")
        role = message.get("role")
        role = "system" if role == "developer" else role
        if role not in ("system", "user", "assistant"):
            raise LineError(f"messages[{i}].role: {role!r} is not supported (system, developer, "
                            "user, assistant)", param=f"messages[{i}].role")
        mapped.append({"role": role, "content": _text_content(message.get("content"), i)})
    return mapped


def _text_content(content: Any, i: int) -> Any:
    if not isinstance(content, list):
        return content  # a string, or something the contract refuses with its own message
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise LineError(f"messages[{i}].content[{j}]: only text parts are supported "
                            f"(got type {kind!r})", param=f"messages[{i}].content[{j}].type")
        texts.append(part["text"])
    return "\n".join(texts)


def _body_field(field: str | None) -> str | None:
    """The body field a contract field came from, for the error's `param`."""
    if field is None:
        return None
    names = {"params.max_new_tokens": "max_completion_tokens",
             "params.max_thinking_tokens": "thinking_token_budget",
             "params.enable_thinking": "chat_template_kwargs.enable_thinking"}
    for prefix, name in names.items():
        if field.startswith(prefix):
            return name
    return field.removeprefix("params.")


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= width else f"{text[:width]}..."


# --- output lines (pure)

_FINISH = {"stop": "stop", "length": "length", "timeout": "length"}


def completion_body(result: ChatResult, job_id: str) -> dict[str, Any]:
    """A `chat.completion` object: the thinking in `reasoning` and `reasoning_content` (what
    vLLM and SGLang/DeepSeek clients read), a timeout reported as `length` (cut short)."""
    reasoning = result.thinking or None
    return {
        "id": f"chatcmpl-{job_id}",
        "object": "chat.completion",
        "created": int(result.timings.finished_at.timestamp()),
        "model": result.model_id,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": result.content,
                        "reasoning": reasoning, "reasoning_content": reasoning},
            "finish_reason": _FINISH.get(result.finish_reason, "stop"),
            "logprobs": None,
        }],
        "usage": {
            "prompt_tokens": result.usage.prompt_tokens,
            "completion_tokens": result.usage.completion_tokens,
            "total_tokens": result.usage.prompt_tokens + result.usage.completion_tokens,
            "completion_tokens_details": {"reasoning_tokens": result.usage.thinking_tokens},
            "prompt_tokens_details": {"cached_tokens": result.usage.cached_prompt_tokens},
        },
    }


def _request_line_id(job_id: str) -> str:
    return f"batch_req_{hashlib.sha256(job_id.encode()).hexdigest()[:24]}"


def output_line(custom_id: str, job_id: str, result: ChatResult) -> dict[str, Any]:
    return {"id": _request_line_id(job_id), "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": job_id,
                         "body": completion_body(result, job_id)},
            "error": None}


# A worker's error code -> the HTTP status a line's response carries; None: no response (the
# line never ran) and the code goes in the line's `error`.
_STATUS: dict[str, int | None] = {
    "invalid_request": 400, "limit_exceeded": 400, "out_of_memory": 500, "internal_error": 500,
    "batch_expired": None, "batch_cancelled": None,
}


def error_line(custom_id: str | None, job_id: str | None,
               error: JobError | LineError) -> dict[str, Any]:
    """An error file line: a 4xx/5xx response with OpenAI's error body, or, for a line that
    never ran (batch_expired, batch_cancelled), no response and the code in `error`."""
    status: int | None
    if isinstance(error, LineError):
        code, message, param, status = error.code, error.message, error.param, error.status_code
    else:
        code, message, param = error.code, error.message, _body_field(error.field)
        status = _STATUS.get(error.code, 500)
    line_id = _request_line_id(job_id or f"{custom_id}")
    if status is None:
        return {"id": line_id, "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": job_id,
                         "body": {"error": {"message": message, "type": kind,
                                            "param": param, "code": code}}},
            "error": None}


def line_outcome(state: str, result: Any) -> Outcome:
    """How a line's final state counts: a result counts completed unless it was cancelled."""
    if state == "SUCCESS":
        cancelled = isinstance(result, dict) and result.get("finish_reason") == "cancelled"
        return "failed" if cancelled else "completed"
    return "failed"


def line_from_meta(custom_id: str, job_id: str, meta: Mapping[str, Any] | None, *,
                   status: Status) -> tuple[Literal["output", "error"], dict[str, Any]] | None:
    """A line's output or error line from Celery's stored task meta; None while it has not
    ended (and its batch still runs)."""
    state = meta.get("status") if meta is not None else None
    result = meta.get("result") if meta is not None else None
    if state == "SUCCESS" and isinstance(result, dict):
        parsed = ChatResult.model_validate(result)
        if parsed.finish_reason == "cancelled":
            return "error", error_line(custom_id, job_id, JobError(
                code="batch_cancelled", message="the batch was cancelled while this line ran "
                f"({parsed.usage.completion_tokens} tokens generated)"))
        return "output", output_line(custom_id, job_id, parsed)
    if state in ("FAILURE", "REVOKED"):
        return "error", error_line(custom_id, job_id, _job_error(result))
    if status in ("expired", "cancelled"):
        code: Literal["batch_expired", "batch_cancelled"] = (
            "batch_expired" if status == "expired" else "batch_cancelled")
        return "error", error_line(custom_id, job_id, JobError(
            code=code, message=f"this line did not run: the batch is {status}"))
    return None


def _job_error(result: Any) -> JobError:
    """The JobError inside Celery's stored exception ({exc_type, exc_message: [payload]})."""
    if isinstance(result, dict) and result.get("exc_type") == "JobFailed":
        args = result.get("exc_message") or [None]
        try:
            return JobError.model_validate(args[0])
        except ValidationError:
            pass
    return JobError(code="internal_error", message=f"the line failed: {_short(result, 200)}")


# --- the batch object (pure)

def batch_status(record: Mapping[str, str], now: float) -> Status:
    """OpenAI's lifecycle from the stored record: derived when read, so no process has to be
    alive to move a batch on (an expired batch reads expired without any worker)."""
    if record.get("failed_at"):
        return "failed"
    done = int(record.get("completed", 0)) + int(record.get("failed", 0))
    total = int(record["total"]) if record.get("total") else None
    finished = total is not None and done >= total
    if record.get("cancelling_at"):
        return "cancelled" if finished else "cancelling"
    if finished:
        return "completed"
    if now >= float(record.get("expires_at", "inf")):
        return "expired"
    return "in_progress" if record.get("in_progress_at") else "validating"


def batch_object(record: Mapping[str, str], now: float) -> dict[str, Any]:
    """OpenAI's Batch object (its fields, with chatqueue's `priority` and `pending` added)."""
    status = batch_status(record, now)
    completed, failed = int(record.get("completed", 0)), int(record.get("failed", 0))
    total = int(record["total"]) if record.get("total") else int(record.get("seen", 0))

    def at(name: str) -> int | None:
        value = record.get(name)
        return int(float(value)) if value else None

    finished_at = at("finished_at")
    return {
        "id": record["id"],
        "object": "batch",
        "endpoint": ENDPOINT,
        "errors": None,
        "input_file_id": record.get("input_file", ""),
        "completion_window": record.get("completion_window", DEFAULT_WINDOW),
        "status": status,
        "output_file_id": None,
        "error_file_id": None,
        "created_at": at("created_at"),
        "in_progress_at": at("in_progress_at"),
        "expires_at": at("expires_at"),
        "finalizing_at": finished_at if status in ("completed",) else None,
        "completed_at": finished_at if status == "completed" else None,
        "failed_at": at("failed_at"),
        "expired_at": at("expires_at") if status == "expired" else None,
        "cancelling_at": at("cancelling_at"),
        "cancelled_at": finished_at if status == "cancelled" else None,
        "request_counts": {"total": total, "completed": completed, "failed": failed},
        "metadata": json.loads(record["metadata"]) if record.get("metadata") else None,
        "priority": int(record.get("priority", BATCH_PRIORITY)),
        "submitted": bool(record.get("total")),
    }


# --- Redis: everything a batch keeps, in one place

# KEYS: errors hash, record; ARGV: line index, error line. A refused line counts failed once,
# however often its submission is resumed.
_RECORD_LINE_ERROR = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('HINCRBY', KEYS[2], 'failed', 1)
  return 1
end
return 0
"""


class BatchStore:
    def __init__(self, client: redis.Redis, *, result_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self._record_line_error = client.register_script(_RECORD_LINE_ERROR)

    def _ttl(self, window_s: float) -> int:
        return int(window_s) + self.result_ttl_s

    def create(self, batch_id: str, *, window: str, window_s: float, priority: int,
               input_file: str, metadata: Mapping[str, str] | None, now: float,
               stream: bool = False) -> bool:
        """Write a new batch's record; False (nothing written) if the batch exists: a
        resumed submission keeps the first one's window and priority."""
        key = batch_key(batch_id)
        if not self.redis.hsetnx(key, "id", batch_id):
            return False
        self.redis.hset(key, mapping={
            "completion_window": window, "window_s": window_s, "created_at": now,
            "expires_at": now + window_s, "priority": priority, "input_file": input_file,
            "metadata": json.dumps(dict(metadata or {})), "completed": 0, "failed": 0,
            "stream": int(stream),
        })
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
            for key in (batch_lines_key(batch_id), batch_ids_key(batch_id),
                        batch_errors_key(batch_id)):
                pipe.expire(key, ttl)
            pipe.hsetnx(batch_key(batch_id), "in_progress_at", time.time())
            pipe.hset(batch_key(batch_id), "seen", max(i for i, _ in lines) + 1)
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

    def lines(self, batch_id: str, total: int,
              chunk: int = 500) -> Iterator[tuple[int, str | None, str | None, Any]]:
        """(index, custom_id, error line JSON or None, task meta or None) for each line, in the
        input's order."""
        for start in range(0, total, chunk):
            indexes = list(range(start, min(total, start + chunk)))
            custom_ids = self.redis.hmget(batch_lines_key(batch_id), indexes)
            errors = self.redis.hmget(batch_errors_key(batch_id), indexes)
            job_ids = [line_job_id(batch_id, _str(c)) if c and e is None else None
                       for c, e in zip(custom_ids, errors, strict=True)]
            wanted = [task_meta(job_id) for job_id in job_ids if job_id is not None]
            metas = iter(self.redis.mget(wanted) if wanted else [])
            for index, custom_id, error, job_id in zip(indexes, custom_ids, errors, job_ids,
                                                       strict=True):
                meta = next(metas) if job_id is not None else None
                yield (index, _str(custom_id) if custom_id else None,
                       _str(error) if error else None,
                       json.loads(meta) if meta else None)

    def list(self, limit: int = 100) -> list[str]:
        ids = self.redis.zrevrange(BATCHES_KEY, 0, limit - 1)
        return [_str(i) for i in ids]


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def task_meta(job_id: str) -> str:
    return f"celery-task-meta-{job_id}"


def mark_finished_if_done(client: Any, batch_id: str) -> None:
    """Stamp the batch's end once every line of a fully submitted batch has ended (the worker
    storing the last result, or the submission that learns the total last)."""
    total, completed, failed = client.hmget(batch_key(batch_id), "total", "completed", "failed")
    if total and int(completed or 0) + int(failed or 0) >= int(total):
        client.hsetnx(batch_key(batch_id), "finished_at", time.time())


# --- the client


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
        window, priority and `stream`). Refused lines become error lines
        at once; the rest of the file runs."""
        path = Path(path)
        if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority {priority}: expected {MIN_PRIORITY}..{MAX_PRIORITY}")
        window_s = parse_window(window)
        if batch_id is None:
            digest = hashlib.sha256()
            with path.open("rb") as file:
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
            batch_id = batch_id_for_digest(digest.hexdigest())
        elif not valid_batch_id(batch_id):
            raise ValueError(f"batch id {batch_id!r}: expected batch_ then 1-64 of "
                             "[A-Za-z0-9_-]")
        created = self.store.create(batch_id, window=window, window_s=window_s,
                                    priority=priority, input_file=path.name, metadata=metadata,
                                    now=time.time(), stream=stream)
        record = self.store.record(batch_id)
        with path.open("rb") as file:
            lines, refused = self.submit_lines(batch_id, file, record)
        return SubmitReport(batch_id, lines, refused, created)

    def submit_lines(self, batch_id: str, lines: Iterable[bytes | str],
                     record: Mapping[str, str]) -> tuple[int, int]:
        """Queue the lines of an existing batch record, chunk by chunk; (lines, refused). The
        record's window, priority and stream choice hold for every line, so a resumed
        submission publishes the very requests the first one did."""
        stream = record.get("stream") == "1"
        window_s = float(record["window_s"])
        expires_at = float(record["expires_at"])
        priority = int(record["priority"])
        count = refused = 0
        chunk: list[tuple[int, bytes | str]] = []
        for text in lines:
            if not text.strip():
                continue  # blank lines (a trailing newline) are no requests
            chunk.append((count, text))
            count += 1
            if len(chunk) == SUBMIT_CHUNK:
                refused += self._submit_chunk(batch_id, chunk, window_s, expires_at, priority,
                                              stream)
                chunk = []
        if chunk:
            refused += self._submit_chunk(batch_id, chunk, window_s, expires_at, priority,
                                          stream)
        if count == 0:
            self.store.fail(batch_id, "the input file has no request lines")
        else:
            self.store.finish_submission(batch_id, count)
        return count, refused

    def _submit_chunk(self, batch_id: str, chunk: list[tuple[int, bytes | str]],
                      window_s: float, expires_at: float, priority: int, stream: bool) -> int:
        from producer.core import Submission  # the client's module: imported when used

        parsed: list[tuple[int, InputLine | LineError]] = []
        for index, text in chunk:
            try:
                parsed.append((index, parse_line(text, index)))
            except LineError as exc:
                parsed.append((index, exc))
        named = [(index, item.custom_id) for index, item in parsed
                 if isinstance(item, InputLine)]
        unique = dict(zip(named, self.store.claim_lines(batch_id, named), strict=True))
        errors: list[tuple[int, dict[str, Any]]] = []
        jobs: list[Submission] = []
        now = time.time()
        for index, item in parsed:
            if isinstance(item, LineError):
                refused = error_line(item.custom_id, None, item)
                refused["id"] = _request_line_id(f"{batch_id}#{index}")  # no custom_id to hash
                errors.append((index, refused))
                continue
            job_id = line_job_id(batch_id, item.custom_id)
            if not unique[(index, item.custom_id)]:
                errors.append((index, error_line(item.custom_id, None, LineError(
                    f"custom_id {item.custom_id!r} is used by an earlier line of the file",
                    param="custom_id"))))
                continue
            try:
                request = map_body(item.body, job_id=job_id, priority=priority)
            except LineError as exc:
                errors.append((index, error_line(item.custom_id, job_id, exc)))
                continue
            line = BatchLine(batch_id=batch_id, custom_id=item.custom_id, expires_at=expires_at,
                             stream=stream)
            jobs.append(Submission(
                job_id=job_id,
                kwargs={"request": request.model_dump(mode="json"), "submitted_at": now,
                        "batch": line.model_dump(mode="json")},
                queue=self.client.queue_for(request)))
        index_of = {index: custom_id for index, custom_id in named}
        self.store.save_lines(batch_id, [(index, index_of.get(index)) for index, _ in chunk],
                              errors, window_s)
        for job in jobs:
            self.client.publish(job)
        return len(errors)

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

    def results(self, batch_id: str) -> Iterator[tuple[Literal["output", "error"],
                                                      dict[str, Any]]]:
        """("output" | "error", line) for each line that has ended, in the input's order; a
        batch expired or cancelled gives its unstarted lines as batch_expired /
        batch_cancelled errors. Lines still running are left out."""
        record = self.store.record(batch_id)
        if not record:
            raise LookupError(f"batch {batch_id}: no such batch, or it expired")
        status = batch_status(record, time.time())
        total = int(record.get("total") or record.get("seen") or 0)
        for _, custom_id, error, meta in self.store.lines(batch_id, total):
            if error is not None:
                yield "error", json.loads(error)
                continue
            if custom_id is None:
                continue  # an index the submission had not reached
            line = line_from_meta(custom_id, line_job_id(batch_id, custom_id), meta,
                                  status=status)
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


def new_batch_id() -> str:
    return f"{BATCH_PREFIX}{uuid.uuid4().hex}"

