"""Output and error file lines from results (pure: no I/O).

`completion_body` is also the gateway's /v1/chat/completions answer; `line_from_meta` turns
Celery's stored task meta of a line into its output or error line; `result_line` is what a
results file holds for one stored line (the blocking and the asyncio client both read
results through it); `line_outcome` is how the worker counts a line's end.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import ValidationError

from producer.batches.ids import line_job_id
from producer.batches.lifecycle import Status
from producer.batches.lines import LineError, body_field, short
from producer.schemas import ChatResult, JobError

Outcome = Literal["completed", "failed"]
Line = tuple[Literal["output", "error"], dict[str, Any]]  # a results file's line, by file

FINISH_REASONS = {"stop": "stop", "length": "length", "timeout": "length"}


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
            "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop"),
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


def request_line_id(job_id: str) -> str:
    return f"batch_req_{hashlib.sha256(job_id.encode()).hexdigest()[:24]}"


def output_line(custom_id: str, job_id: str, result: ChatResult) -> dict[str, Any]:
    return {"id": request_line_id(job_id), "custom_id": custom_id,
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
        code, message, param = error.code, error.message, body_field(error.field)
        status = _STATUS.get(error.code, 500)
    line_id = request_line_id(job_id or f"{custom_id}")
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


def result_line(batch_id: str, custom_id: str | None, error: str | None,
                meta: Mapping[str, Any] | None, *, status: Status) -> Line | None:
    """What the results hold for one stored line (a row of `BatchStore.lines`): its error line
    if it was refused at submission, else its output or error line from the task meta; None
    for an index the submission had not reached, or a line that has not ended."""
    if error is not None:
        return "error", json.loads(error)
    if custom_id is None:
        return None  # an index the submission had not reached
    return line_from_meta(custom_id, line_job_id(batch_id, custom_id), meta, status=status)


def line_from_meta(custom_id: str, job_id: str, meta: Mapping[str, Any] | None, *,
                   status: Status) -> Line | None:
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
    return JobError(code="internal_error", message=f"the line failed: {short(result, 200)}")
