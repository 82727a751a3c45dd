"""A Batch input line -> the job contract, or a LineError (OpenAI's 400) naming the field.

Pure (no I/O): the blocking BatchClient, the asyncio client and the gateway's
/v1/chat/completions share it (`parse_line`, `read_line`, `map_body`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from producer.batches.ids import ENDPOINT, MAX_CUSTOM_ID_CHARS
from producer.errors import ChatQueueError
from producer.schemas import (
    BATCH_PRIORITY,
    ChatRequest,
    JobError,
    error_from_validation,
    request_size,
)


class LineError(ChatQueueError):
    """A line that cannot run as given: OpenAI's 400 (or the error code, for a line that never
    got a response). The rest of the file runs. Never retried: the same line fails the same
    way (outcome "failed", its `code` per line)."""

    outcome = "failed"

    def __init__(self, message: str, *, param: str | None = None,
                 code: str = "invalid_request", status_code: int = 400,
                 custom_id: str | None = None, limit: int | float | str | None = None,
                 value: int | float | str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code  # type: ignore[misc]  # the base's class-wide code, set per line here
        self.status_code, self.custom_id = status_code, custom_id
        # What the contract's JobError says of a refused value (the gateway's 400 carries them).
        self.limit, self.value = limit, value

    def job_error(self) -> JobError:
        return JobError.model_validate({"code": self.code, "field": self.param,
                                        "message": self.message, "limit": self.limit,
                                        "value": self.value})


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


def read_line(text: str | bytes, index: int, max_bytes: int) -> InputLine | LineError:
    """A line as submission keeps it: parsed, and its body held to the producer's byte limit
    (settings.max_request_bytes, as a single request is), so a chunk of lines waiting for
    Redis never holds an oversized body. A refused line comes back as its LineError."""
    try:
        line = parse_line(text, index)
        check_size(line.body, max_bytes, custom_id=line.custom_id)
    except LineError as exc:
        return exc
    return line


def check_size(raw: Any, max_bytes: int, *, custom_id: str | None = None) -> None:
    """LineError (limit_exceeded, param "body") when `raw` -- a line's body, or the request it
    maps to as published -- is over `max_bytes` as compact UTF-8 JSON, measured as the
    producer's single submit and the worker measure a request (schemas.request_size)."""
    size = request_size(raw)
    if size > max_bytes:
        raise LineError(f"body: the request is {size} bytes as JSON, over the producer's limit "
                        f"of {max_bytes} (max_request_bytes)", param="body",
                        code="limit_exceeded", custom_id=custom_id, limit=max_bytes, value=size)




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
        raise LineError(f"{name}: not supported by this server (got {short(value)})",
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
        param = body_field(error.field)
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


def body_field(field: str | None) -> str | None:
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


def short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= width else f"{text[:width]}..."
