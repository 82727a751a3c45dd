"""The job contract between backends and workers: requests, results and errors (pydantic v2).

The worker imports this module; this module imports nothing of the worker's, so a backend can
validate a request before it is ever queued.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

# Hard ceilings of the contract itself; each worker enforces its own, lower limits on top.
MAX_MESSAGES = 256
MAX_MESSAGE_CHARS = 200_000
# The whole request as UTF-8 JSON: what binds before the per-message ceilings do (256 messages
# of 200,000 characters made a 51 MB request that took a worker from 72 to 390 MB). 1 MiB is
# about 250k tokens of English, far past any served model's context; workers default to it and
# the producer refuses a larger request before it is published.
MAX_REQUEST_BYTES = 1_048_576
MAX_NEW_TOKENS_CEILING = 131_072
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
# Higher runs first: taken from Redis first and admitted to the engine first.
MIN_PRIORITY, MAX_PRIORITY = 0, 9
DEFAULT_PRIORITY = 5  # interactive jobs
BATCH_PRIORITY = 2  # batch lines, unless their batch says otherwise: below interactive jobs
MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$"

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "cancelled", "timeout"]
ErrorCode = Literal[
    "invalid_request",  # the request breaks the contract: never retried
    "limit_exceeded",  # valid, but over a limit this worker enforces: never retried
    "out_of_memory",  # the device could not fit the job even alone
    "internal_error",  # a bug or a fault of ours
    "batch_expired",  # a batch line not started within its batch's completion window
    "batch_cancelled",  # a batch line not started before its batch was cancelled
]


class _Reply(BaseModel):
    """What a worker writes and a producer reads. Fields a producer does not know are ignored, so
    workers can be upgraded first (a rolling upgrade) without breaking older producers."""

    model_config = ConfigDict(extra="ignore")


class _Request(BaseModel):
    # Requests arrive as JSON: take each field in its own JSON type, so a "10", a true or a 1.5
    # where an integer belongs is refused rather than guessed at (an integer still reads as a
    # float). Results keep the lax default: their datetimes arrive as strings.
    model_config = ConfigDict(extra="forbid", strict=True)


class ChatMessage(_Request):
    role: Role
    content: str = Field(min_length=1, max_length=MAX_MESSAGE_CHARS)

    @field_validator("content")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("content must not be blank")
        return value


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class GenerationParams(_Request):
    """Unset sampling fields take the model's own defaults (its generation_config.json)."""

    max_new_tokens: int | None = Field(
        default=None, ge=1, le=MAX_NEW_TOKENS_CEILING, description="None: the worker's default."
    )
    do_sample: bool | None = Field(
        default=None, description="False: greedy. None: the model's default."
    )
    temperature: float | None = Field(default=None, gt=0.0, le=10.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000, description="0 disables top-k.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    enable_thinking: bool = True
    ignore_eos: bool = Field(
        default=False, description="Generate exactly max_new_tokens (benchmarks)."
    )
    timeout_s: float | None = Field(
        default=None, gt=0, le=7 * 86_400,
        description="Seconds from the job's start; the worker's max_job_seconds caps it.",
    )
    max_thinking_tokens: int | None = Field(
        default=None, ge=0, le=MAX_NEW_TOKENS_CEILING,
        description="Close the think block after this many thinking tokens, then answer.",
    )
    stop: list[StopString] | None = Field(
        default=None, min_length=1, max_length=MAX_STOP_STRINGS,
        description="Generation ends where one of these appears in the answer; the text stops "
                    "before it and finish_reason is \"stop\" (OpenAI's semantics). The thinking "
                    "is not searched.",
    )


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    params: GenerationParams = Field(default_factory=GenerationParams)
    job_id: str | None = Field(
        default=None, pattern=JOB_ID_PATTERN, description="Client-chosen id; a UUID when unset."
    )
    model: str | None = Field(
        default=None, pattern=MODEL_ID_PATTERN,
        description="Hub repo id of the model to run it; the producer's default_model when unset.",
    )
    priority: int = Field(
        default=DEFAULT_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY,
        description="Higher runs first: taken from the queue and admitted to the engine first.",
    )

    @model_validator(mode="after")
    def _last_turn_is_user(self) -> ChatRequest:
        last = self.messages[-1].role
        if last != "user":
            raise ValueError(f"the last message must come from the user, got role {last!r}")
        return self


class BatchLine(_Request):
    """Which batch line a job is (the task's `batch` argument): the worker ends it unstarted
    once its batch is cancelled or past its window, and keeps its token stream only if asked."""

    batch_id: str = Field(pattern=JOB_ID_PATTERN)
    custom_id: str = Field(min_length=1, max_length=512)
    expires_at: float | None = Field(default=None, ge=0, le=1e11)
    stream: bool = False


class Usage(_Reply):
    prompt_tokens: int
    completion_tokens: int
    thinking_tokens: int
    # Prompt tokens served from the worker's prefix cache (OpenAI's prompt_tokens_details.
    # cached_tokens); 0 from workers older than this field.
    cached_prompt_tokens: int = 0


class Timings(_Reply):
    queued_at: datetime | None
    started_at: datetime
    finished_at: datetime
    queue_wait_s: float | None  # submitted -> a worker's task slot started the job
    # Part of generation_s: the job's wait in the worker's engine for a row in the running batch
    # (about 0 while the batch has room). None from workers older than this field.
    batch_wait_s: float | None = None
    # Task slot start -> the first token was generated (add queue_wait_s for the time from
    # submission). None when no token was generated, or from workers older than this field.
    first_token_s: float | None = None
    generation_s: float  # task slot start -> result built
    tokens_per_s: float


class ChatResult(_Reply):
    job_id: str
    model_id: str
    model_revision: str
    thinking: str
    content: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    worker_host: str
    worker_name: str | None = None  # the Celery node name: one per GPU on a multi-GPU host
    device: str


class StreamEvent(_Reply):
    """One entry of a job's token stream: a piece of text, a (re)start, or the end."""

    type: Literal["start", "thinking", "content", "end"]
    text: str = ""
    finish_reason: FinishReason | None = None


class Progress(_Reply):
    """What a running job's Celery state (PROGRESS) carries."""

    phase: Literal["queued", "thinking", "answering"]
    tokens: int


class JobError(_Reply):
    code: ErrorCode
    field: str | None = None
    message: str
    limit: int | float | str | None = None
    value: int | float | str | None = None


def error_from_validation(exc: ValidationError) -> JobError:
    """The first problem pydantic found, as a JobError naming the field, the limit and the value."""
    first = exc.errors(include_url=False)[0]
    # Field names can come from the input itself (an unknown key): bound and escape them too.
    field = _printable(".".join(str(part) for part in first["loc"]), width=120) or None
    ctx = first.get("ctx") or {}
    limit_keys = ("le", "lt", "ge", "gt", "max_length", "min_length", "pattern")
    limit = next((ctx[key] for key in limit_keys if key in ctx), None)
    value = _short(first.get("input"))
    where = field or "request"
    message = f"{where}: {_printable(first['msg'], width=300)} (got {value})"
    return JobError(code="invalid_request", field=field, message=message,
                    limit=_scalar(limit), value=value)


def request_size(raw: Any) -> int:
    """A request's size in bytes as compact UTF-8 JSON, as the worker measures it (a lone
    surrogate counts its 3 bytes; a value JSON cannot carry counts as its str())."""
    text = json.dumps(raw, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode("utf-8", "surrogatepass"))


def request_too_large(size: int, limit: int, whose: str) -> JobError:
    """The error for a request over a byte limit: field "request", the limit and the size."""
    return JobError(code="limit_exceeded", field="request", limit=limit, value=size,
                    message=f"request: the request is {size} bytes as JSON, over {whose} limit "
                            f"of {limit}")


def _short(value: Any, width: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def _printable(text: str, width: int) -> str:
    """Valid UTF-8 (a lone surrogate is escaped) and at most about `width` characters."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text if len(text) <= width else f"{text[:width]}... ({len(text)} chars)"


def _scalar(value: Any) -> int | float | str | None:
    return value if value is None or isinstance(value, int | float | str) else str(value)
