"""OpenAI's chat completions API in chatqueue's terms, as pure functions: a request to the job
contract, a result to a completion, stream events to chunks, errors to OpenAI's error shape."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.core import parse_request
from producer.errors import JobFailed
from producer.schemas import ChatRequest, ChatResult, JobError, StreamEvent, error_from_validation

# Contract field -> the OpenAI field a client set it with (errors name what the client sent).
_PARAM_FIELDS = {
    "params.temperature": "temperature",
    "params.top_p": "top_p",
    "params.top_k": "top_k",
    "params.seed": "seed",
    "params.ignore_eos": "ignore_eos",
    "params.enable_thinking": "chat_template_kwargs.enable_thinking",
    "model": "model",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatTemplateKwargs(BaseModel):
    model_config = ConfigDict(extra="ignore")
    enable_thinking: bool | None = None


class ChatCompletionRequest(_Strict):
    """The fields this gateway honours; any other is refused (400 naming it), as OpenAI does."""

    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None
    ignore_eos: bool | None = None


def to_job(body: Any) -> tuple[ChatCompletionRequest, ChatRequest]:
    """The OpenAI request and the job it becomes; raises JobFailed naming the OpenAI field, the
    limit and the value when either is bad."""
    try:
        openai = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        raise JobFailed(error_from_validation(exc)) from None
    params: dict[str, Any] = {}
    tokens_field = "max_completion_tokens" if openai.max_completion_tokens is not None \
        else "max_tokens"
    max_tokens = openai.max_completion_tokens if openai.max_completion_tokens is not None \
        else openai.max_tokens
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    if openai.temperature == 0:
        params["do_sample"] = False  # OpenAI's temperature 0 is greedy decoding
    elif openai.temperature is not None:
        params["temperature"] = openai.temperature
    for name in ("top_p", "top_k", "seed", "ignore_eos"):
        if (value := getattr(openai, name)) is not None:
            params[name] = value
    if openai.chat_template_kwargs and openai.chat_template_kwargs.enable_thinking is not None:
        params["enable_thinking"] = openai.chat_template_kwargs.enable_thinking
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str)
                 else "".join(part.text for part in m.content)} for m in openai.messages]
    raw = {"messages": messages, "params": params, "model": openai.model}
    try:
        return openai, parse_request(raw)
    except JobFailed as failed:
        raise JobFailed(rename_field(failed.error, tokens_field)) from None


def rename_field(error: JobError, tokens_field: str = "max_tokens") -> JobError:
    """A contract error as the OpenAI client would read it: the field it sent."""
    field = error.field
    renamed = tokens_field if field == "params.max_new_tokens" else _PARAM_FIELDS.get(field or "")
    if field is None or renamed is None:
        return error
    return error.model_copy(update={"field": renamed,
                                    "message": error.message.replace(field, renamed, 1)})


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


def usage(result: ChatResult) -> dict[str, Any]:
    used = result.usage
    return {
        "prompt_tokens": used.prompt_tokens,
        "completion_tokens": used.completion_tokens,
        "total_tokens": used.prompt_tokens + used.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": used.thinking_tokens},
        "prompt_tokens_details": {"cached_tokens": used.cached_prompt_tokens},
    }


def completion(result: ChatResult, model: str, created: int | None = None) -> dict[str, Any]:
    """A finished job as a chat.completion. finish_reason is the job's own: stop, length, and
    chatqueue's cancelled and timeout."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content}
    if result.thinking:
        message["reasoning"] = message["reasoning_content"] = result.thinking
    return {
        "id": completion_id(result.job_id),
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": result.finish_reason,
                     "logprobs": None}],
        "usage": usage(result),
    }


class ChunkWriter:
    """A job's stream events as chat.completion.chunk objects."""

    def __init__(self, job_id: str, model: str) -> None:
        self.id, self.model, self.created = completion_id(job_id), model, int(time.time())
        self.started = False

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
            return self.chunk({}, finish_reason=event.finish_reason or "stop")
        return None

    def usage(self, result: ChatResult) -> dict[str, Any]:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model, "choices": [], "usage": usage(result)}
