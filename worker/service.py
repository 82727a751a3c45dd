"""What a task slot does with one job, as plain functions that tests call without Celery.

validate -> template -> tokenize -> check limits -> engine -> split -> ChatResult.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from producer.errors import JobFailed
from producer.schemas import ChatRequest, ChatResult, JobError, Timings, Usage, error_from_validation
from worker.engine import DeviceOutOfMemory, Engine, EngineLimits, EngineRequest
from worker.model import LoadedModel
from worker.pipeline.prompt import build_prompt
from worker.pipeline.reasoning import decode_part, prompt_opens_thinking, split_reasoning
from worker.pipeline.sampling import SamplingParams, resolve_sampling
from worker.pipeline.tokenize import tokenize_prompt
from worker.settings import WorkerSettings


@dataclass
class WorkerRuntime:
    """Everything a worker process holds once: settings, the loaded model and its engine."""

    settings: WorkerSettings
    loaded: LoadedModel
    engine: Engine
    host: str

    @classmethod
    def start(cls, settings: WorkerSettings, loaded: LoadedModel) -> WorkerRuntime:
        limits = EngineLimits(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            batch_wait_s=settings.batch_wait_ms / 1000,
        )
        engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=limits).start()
        return cls(settings=settings, loaded=loaded, engine=engine, host=socket.gethostname())

    def warm_up(self) -> None:
        """One short generation, so the first real job does not pay for lazy initialisation."""
        prompt = build_prompt_ids(self.loaded, ChatRequest.model_validate(
            {"messages": [{"role": "user", "content": "Hello"}]}))
        self.engine.generate(EngineRequest(prompt, 2, SamplingParams(do_sample=False),
                                           self.loaded.stop_ids))

    def stop(self) -> None:
        self.engine.stop()


@dataclass(frozen=True)
class PreparedJob:
    request: ChatRequest
    engine_request: EngineRequest
    prompt_opened_thinking: bool


def parse_request(raw: Any) -> ChatRequest:
    try:
        return ChatRequest.model_validate(raw)
    except ValidationError as exc:
        raise JobFailed(error_from_validation(exc)) from None


def build_prompt_ids(loaded: LoadedModel, request: ChatRequest) -> list[int]:
    prompt = build_prompt(loaded.tokenizer, request.messages,
                          enable_thinking=request.params.enable_thinking)
    return tokenize_prompt(loaded.tokenizer, prompt)


def prepare_job(runtime: WorkerRuntime, request: ChatRequest) -> PreparedJob:
    """Template and tokenize, then check the limits this worker enforces."""
    settings, loaded = runtime.settings, runtime.loaded
    max_new = request.params.max_new_tokens or settings.default_max_new_tokens
    if max_new > settings.max_new_tokens_cap:
        raise _limit_error("params.max_new_tokens", settings.max_new_tokens_cap, max_new,
                           "max_new_tokens {value} exceeds this worker's cap of {limit}")
    prompt_ids = build_prompt_ids(loaded, request)
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise _limit_error("messages", settings.max_prompt_tokens, len(prompt_ids),
                           "the prompt is {value} tokens, over this worker's limit of {limit}")
    if loaded.context_length and len(prompt_ids) + max_new > loaded.context_length:
        raise _limit_error(
            "params.max_new_tokens", loaded.context_length, len(prompt_ids) + max_new,
            "prompt tokens + max_new_tokens = {value}, over the model's context of {limit}",
        )
    stop_ids = frozenset() if request.params.ignore_eos else loaded.stop_ids
    return PreparedJob(
        request=request,
        engine_request=EngineRequest(
            prompt_ids=prompt_ids, max_new_tokens=max_new,
            sampling=resolve_sampling(request.params, loaded.generation_defaults),
            stop_ids=stop_ids,
        ),
        prompt_opened_thinking=prompt_opens_thinking(prompt_ids, loaded.think),
    )


def run_job(runtime: WorkerRuntime, raw_request: Any, *, job_id: str,
            submitted_at: float | None = None) -> ChatResult:
    """Run one job to its result; raises JobFailed with a structured error (never retried)."""
    started_at = time.time()
    prepared = prepare_job(runtime, parse_request(raw_request))
    try:
        output = runtime.engine.generate(prepared.engine_request)
    except DeviceOutOfMemory as exc:
        raise JobFailed(JobError(code="out_of_memory", message=str(exc))) from None
    finished_at = time.time()

    loaded = runtime.loaded
    split = split_reasoning(output.token_ids, loaded.think,
                            prompt_opened_thinking=prepared.prompt_opened_thinking)
    generation_s = finished_at - started_at
    completion = len(output.token_ids)
    return ChatResult(
        job_id=job_id,
        model_id=loaded.manifest.repo_id,
        model_revision=loaded.manifest.commit,
        thinking=decode_part(loaded.tokenizer, split.thinking_ids, loaded.think),
        content=decode_part(loaded.tokenizer, split.content_ids, loaded.think),
        finish_reason=output.finish_reason,
        usage=Usage(prompt_tokens=len(prepared.engine_request.prompt_ids),
                    completion_tokens=completion, thinking_tokens=split.thinking_tokens),
        timings=Timings(
            queued_at=_utc(submitted_at) if submitted_at else None,
            started_at=_utc(started_at),
            finished_at=_utc(finished_at),
            queue_wait_s=max(0.0, started_at - submitted_at) if submitted_at else None,
            generation_s=generation_s,
            tokens_per_s=completion / generation_s if generation_s > 0 else 0.0,
        ),
        worker_host=runtime.host,
        device=str(loaded.device),
    )


def _limit_error(field: str, limit: int, value: int, template: str) -> JobFailed:
    message = f"{field}: " + template.format(limit=limit, value=value)
    return JobFailed(JobError(code="limit_exceeded", field=field, message=message,
                              limit=limit, value=value))


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)
