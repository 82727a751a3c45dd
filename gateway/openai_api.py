"""OpenAI's chat completions API in chatqueue's terms, as pure functions: a request to the job
contract, a result to a completion, stream events to chunks, errors to OpenAI's error shape."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from json.encoder import encode_basestring  # json's C string encoder
from typing import Any

from producer.batches import _FINISH as FINISH_REASONS  # one mapping with batch output
from producer.batches import LineError, completion_body, map_body
from producer.schemas import DEFAULT_PRIORITY, ChatRequest, ChatResult, JobError, StreamEvent


@dataclass(frozen=True)
class Options:
    """What an HTTP request asks beyond the job itself."""

    model: str
    stream: bool
    include_usage: bool


def to_job(body: Any) -> tuple[Options, ChatRequest]:
    """An OpenAI chat.completions body as the job contract, mapped by the batch module's own
    map_body (one mapping for HTTP and for batch lines); LineError naming the field, the limit
    and the value when the product cannot honour it or the contract refuses it."""
    if not isinstance(body, dict):
        raise LineError("the body must be a JSON object")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise LineError(f"stream: must be true or false (got {stream!r})", param="stream")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict) or set(stream_options) - {"include_usage"}:
            raise LineError("stream_options: only include_usage is supported",
                            param="stream_options")
        include_usage = stream_options.get("include_usage") is True
    job = map_body({k: v for k, v in body.items() if k not in ("stream", "stream_options")},
                   priority=DEFAULT_PRIORITY)
    model = body.get("model")
    return Options(model=model if isinstance(model, str) else "", stream=stream,
                   include_usage=include_usage), job


def line_error_body(error: LineError) -> dict[str, Any]:
    type_ = "invalid_request_error" if error.status_code < 500 else "server_error"
    return error_body(error.message, type_=type_, code=error.code, param=error.param,
                      limit=error.limit, value=error.value)


def error_body(message: str, *, type_: str, code: str | None = None, param: str | None = None,
               **extra: Any) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code, **extra}}


def job_error_body(error: JobError) -> dict[str, Any]:
    type_ = "invalid_request_error" if error.code in ("invalid_request", "limit_exceeded") \
        else "server_error"
    return error_body(error.message, type_=type_, code=error.code, param=error.field,
                      limit=error.limit, value=error.value)


def job_error_status(error: JobError) -> int:
    return 400 if error.code in ("invalid_request", "limit_exceeded") else 500


def completion_id(job_id: str) -> str:
    return f"chatcmpl-{job_id}"


def completion(result: ChatResult) -> dict[str, Any]:
    """A finished job as a chat.completion: the batch module's body, so HTTP and batch output
    read the same."""
    return completion_body(result, result.job_id)


def sse(payload: dict[str, Any]) -> bytes:
    """A server-sent event carrying `payload` as compact JSON."""
    return b"data: %b\n\n" % json.dumps(payload, ensure_ascii=False,
                                         separators=(",", ":")).encode()


class ChunkWriter:
    """A job's stream events as chat.completion.chunk objects."""

    def __init__(self, job_id: str, model: str) -> None:
        self.id, self.model, self.created = completion_id(job_id), model, int(time.time())
        self.started = False
        # A text chunk's bytes around its delta, formatted once: the events of every token are
        # framed without building and encoding the whole chunk (the same bytes as
        # sse(self.event(event)): tests/unit/test_gateway_unit.py).
        head = sse(self.chunk({}))
        self._head = head[:head.index(b'"delta":') + len(b'"delta":')]
        self._tail = b',"finish_reason":null,"logprobs":null}]}\n\n'

    def event_bytes(self, event: StreamEvent) -> bytes | None:
        """The server-sent event of a stream event, or None for an event that sends none."""
        if event.text and event.type in ("thinking", "content"):
            text = encode_basestring(event.text).encode()
            if event.type == "content":
                return b"%b{\"content\":%b}%b" % (self._head, text, self._tail)
            return b"%b{\"reasoning\":%b,\"reasoning_content\":%b}%b" % (
                self._head, text, text, self._tail)
        chunk = self.event(event)
        return None if chunk is None else sse(chunk)

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                             "logprobs": None}]}

    def first(self) -> dict[str, Any]:
        self.started = True
        return self.chunk({"role": "assistant", "content": ""})

    def event(self, event: StreamEvent) -> dict[str, Any] | None:
        if event.type == "thinking" and event.text:
            return self.chunk({"reasoning": event.text, "reasoning_content": event.text})
        if event.type == "content" and event.text:
            return self.chunk({"content": event.text})
        if event.type == "end":
            reason = event.finish_reason or "stop"
            return self.chunk({}, finish_reason=FINISH_REASONS.get(reason, "stop"))
        return None

    def usage(self, result: ChatResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [],
                "usage": completion_body(result, result.job_id)["usage"]}
