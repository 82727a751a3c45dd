"""What a task slot does with one job, as plain functions that tests call without Celery.

validate -> template -> tokenize -> check limits -> engine -> split -> ChatResult.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.batches import batch_cancel_key
from producer.core import parse_request as _parse_request
from producer.errors import JobFailed
from producer.schemas import (
    BatchLine,
    ChatRequest,
    ChatResult,
    JobError,
    error_from_validation,
    request_size,
)
from worker.control import JobControl
from worker.engine import EngineOutput, EngineRequest
from worker.errors import JobInterrupted
from worker.lease import Lease
from worker.model import LoadedModel
from worker.outcome import job_failed
from worker.pipeline.prompt import build_prompt
from worker.pipeline.reasoning import prompt_opens_thinking
from worker.pipeline.sampling import resolve_sampling
from worker.pipeline.stop import StopStringCheck
from worker.pipeline.tokenize import tokenize_prompt
from worker.relay import ProgressEncoder
from worker.result import build_result

if TYPE_CHECKING:
    from worker.startup import WorkerRuntime

__all__ = ["parse_request", "prepare_job", "request_size", "run_job", "task_arguments"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedJob:
    request: ChatRequest
    engine_request: EngineRequest
    prompt_opened_thinking: bool


class TaskArguments(BaseModel):
    """The task's arguments as the producer sends them, all keywords."""

    model_config = ConfigDict(extra="forbid")

    request: Any
    submitted_at: float | None = Field(default=None, ge=0, le=1e11, allow_inf_nan=False)
    batch: BatchLine | None = None


def task_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> TaskArguments:
    """A message with other arguments gets a structured error, not a TypeError from the call."""
    if args:
        raise JobFailed(JobError(
            code="invalid_request", field="args", limit=0, value=len(args),
            message=f"args: the task takes keyword arguments only, got {len(args)} positional",
        ))
    try:
        return TaskArguments.model_validate(kwargs)
    except ValidationError as exc:
        raise JobFailed(error_from_validation(exc)) from None


def parse_request(raw: Any, max_bytes: int | None = None) -> ChatRequest:
    """The request as the contract reads it (the producer's own check, so a client gets the
    error a worker would store); the size is checked before anything parses it."""
    return _parse_request(raw, max_bytes, whose="this worker's")


def build_prompt_ids(loaded: LoadedModel, request: ChatRequest) -> list[int]:
    prompt = build_prompt(loaded.tokenizer, request.messages,
                          enable_thinking=request.params.enable_thinking)
    return tokenize_prompt(loaded.tokenizer, prompt)


def prepare_job(runtime: WorkerRuntime, request: ChatRequest) -> PreparedJob:
    """Template and tokenize, then check the limits this worker enforces."""
    settings, loaded = runtime.settings, runtime.loaded
    served = loaded.manifest.repo_id
    if request.model is not None and request.model != served:
        raise JobFailed(JobError(
            code="invalid_request", field="model", limit=served, value=request.model,
            message=f"model: this worker serves {served}, not {request.model!r}; "
                    "check the producer's routing (CHATQUEUE_QUEUE sends every model to one queue)",
        ))
    if len(request.messages) > settings.max_messages:
        raise _limit_error("messages", settings.max_messages, len(request.messages),
                           "{value} messages, over this worker's limit of {limit}")
    max_new = request.params.max_new_tokens or settings.default_max_new_tokens
    if max_new > settings.max_new_tokens_cap:
        raise _limit_error("params.max_new_tokens", settings.max_new_tokens_cap, max_new,
                           "max_new_tokens {value} exceeds this worker's cap of {limit}")
    prompt_ids = build_prompt_ids(loaded, request)
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise _limit_error("messages", settings.max_prompt_tokens, len(prompt_ids),
                           "the prompt is {value} tokens, over this worker's limit of {limit}")
    if loaded.context_length and len(prompt_ids) >= loaded.context_length:
        raise _limit_error("messages", loaded.context_length, len(prompt_ids),
                           "the prompt is {value} tokens, over the model's context of {limit}")
    if loaded.context_length and len(prompt_ids) + max_new > loaded.context_length:
        raise _limit_error(
            "params.max_new_tokens", loaded.context_length, len(prompt_ids) + max_new,
            "prompt tokens + max_new_tokens = {value}, over the model's context of {limit}",
        )
    params = request.params
    opened = prompt_opens_thinking(prompt_ids, loaded.think)
    time_allowed = min(params.timeout_s or settings.max_job_seconds, settings.max_job_seconds)
    return PreparedJob(
        request=request,
        engine_request=EngineRequest(
            prompt_ids=prompt_ids, max_new_tokens=max_new,
            sampling=resolve_sampling(params, loaded.generation_defaults),
            stop_ids=frozenset() if params.ignore_eos else loaded.stop_ids,
            deadline=time.monotonic() + time_allowed,
            thinking_budget=params.max_thinking_tokens,
            close_thinking_ids=loaded.close_thinking_ids,
            prompt_opened_thinking=opened,
            stop_text=StopStringCheck(loaded.tokenizer, loaded.think, params.stop,
                                      prompt_opened_thinking=opened) if params.stop else None,
            priority=request.priority,
        ),
        prompt_opened_thinking=opened,
    )


def run_job(runtime: WorkerRuntime, raw_request: Any, *, job_id: str,
            submitted_at: float | None = None,
            progress: ProgressEncoder | None = None,
            lease: Lease | None = None, batch: BatchLine | None = None) -> ChatResult:
    """Run one job to its result; raises JobFailed with a structured error (never retried),
    or JobInterrupted when this worker cannot finish it (it stops, Redis went away, or its
    `lease` went to another run) and the job should go back to the queue. Every job that ends
    is counted in the metrics; every job, whatever its end, is logged in one line."""
    try:
        result, batch_size = _run(runtime, raw_request, job_id=job_id,
                                  submitted_at=submitted_at, progress=progress, lease=lease,
                                  batch=batch)
    except Exception as exc:
        settled = job_failed(runtime.metrics, job_id, exc)
        if settled is exc:
            raise
        raise settled from (None if isinstance(settled, JobFailed) else exc)
    runtime.metrics.job_finished(result, batch_size=batch_size or None)
    log.info(
        "job %s done: model=%s finish=%s prompt=%d completion=%d thinking=%d "
        "queue_wait=%.3fs batch_wait=%.3fs generation=%.3fs tok/s=%.1f batch=%d", job_id,
        result.model_id, result.finish_reason, result.usage.prompt_tokens,
        result.usage.completion_tokens, result.usage.thinking_tokens,
        result.timings.queue_wait_s or 0.0, result.timings.batch_wait_s or 0.0,
        result.timings.generation_s, result.timings.tokens_per_s, batch_size,
    )
    return result


def _run(runtime: WorkerRuntime, raw_request: Any, *, job_id: str, submitted_at: float | None,
         progress: ProgressEncoder | None,
         lease: Lease | None = None, batch: BatchLine | None = None) -> tuple[ChatResult, int]:
    """Returns the result and the largest batch the job ran in.

    While the engine decodes, the worker's relay streams the new text to Redis and stores the
    progress; this thread (the task slot) only waits for the job's end."""
    started = (time.time(), time.monotonic())  # wall clock for the record, monotonic for spans
    request = parse_request(raw_request, max_bytes=runtime.settings.max_request_bytes)
    prepared = prepare_job(runtime, request)
    control, drain = runtime.control, runtime.drain
    if batch is not None:
        _check_batch_line(control, batch)
    if control is not None and control.cancelled_before_start(job_id):
        never_started = EngineOutput([], "cancelled", 0)
        return build_result(runtime, prepared, job_id, never_started, submitted_at, started), 0
    relay, followed = runtime.relay, None
    # The engine's errors (out of memory: failed; stopped: requeued) and a drain's
    # JobInterrupted reach run_job as they are; worker/outcome.py settles them.
    job = runtime.engine.submit(prepared.engine_request)
    if lease is not None:
        lease.on_lost(job.cancel)  # another run owns the job now: free the device
    with drain.hold(job):
        try:
            if control is not None:
                control.track(job_id, job)
            followed = None if relay is None else relay.follow(
                job_id, job, prompt_opened_thinking=prepared.prompt_opened_thinking,
                stops=tuple(request.params.stop or ()), lease=lease,
                streamed=batch is None or batch.stream, encode_progress=progress)
            output = job.future.result()
            if relay is not None and followed is not None:
                # The stream's end goes out before the result is stored.
                followed.written.wait(relay.flush_timeout_s + 5.0)
        finally:
            if not job.future.done():
                job.cancel()  # this slot stops waiting for it: free the device
            if relay is not None and followed is not None:
                relay.forget(followed)
            if control is not None:
                control.untrack(job_id)
    if lease is not None and lease.lost.is_set():
        raise JobInterrupted("its lease is held by another run, whose result will stand")
    return build_result(runtime, prepared, job_id, output, submitted_at, started), \
        output.batch_size


def _check_batch_line(control: JobControl | None, batch: BatchLine) -> None:
    """A batch line that has not started by its batch's cancel or the end of its window never
    starts: it ends as an error line of the batch."""
    if batch.expires_at is not None and time.time() >= batch.expires_at:
        raise JobFailed(JobError(
            code="batch_expired", message=f"batch {batch.batch_id}: this line did not start "
            "within the batch's completion window"))
    if control is not None and control.redis.exists(batch_cancel_key(batch.batch_id)):
        raise JobFailed(JobError(
            code="batch_cancelled", message=f"batch {batch.batch_id} was cancelled before this "
            "line started"))


def _limit_error(field: str, limit: int, value: int, template: str) -> JobFailed:
    message = f"{field}: " + template.format(limit=limit, value=value)
    return JobFailed(JobError(code="limit_exceeded", field=field, message=message,
                              limit=limit, value=value))
