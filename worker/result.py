"""A finished job's ChatResult: the engine's token ids split into thinking and content
(worker/pipeline/reasoning.py), stop strings applied, usage and timings."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from producer.schemas import ChatResult, Timings, Usage
from worker.engine import EngineOutput
from worker.pipeline.reasoning import decode_part, split_reasoning
from worker.pipeline.stop import truncate_at_stop

if TYPE_CHECKING:
    from worker.service import PreparedJob
    from worker.startup import WorkerRuntime


def build_result(runtime: WorkerRuntime, prepared: PreparedJob, job_id: str, output: EngineOutput,
                 submitted_at: float | None, started: tuple[float, float]) -> ChatResult:
    """The job's result from the engine's output: the final split, stop strings applied,
    usage and timings. `started`: when the task slot took the job, as time.time() and
    time.monotonic()."""
    started_at, started_mono = started
    finished_at = time.time()
    loaded = runtime.loaded
    split = split_reasoning(output.token_ids, loaded.think,
                            prompt_opened_thinking=prepared.prompt_opened_thinking)
    generation_s = finished_at - started_at
    completion = len(output.token_ids)
    content = decode_part(loaded.tokenizer, split.content_ids, loaded.think)
    finish_reason = output.finish_reason
    if prepared.request.params.stop:
        content, stopped = truncate_at_stop(content, prepared.request.params.stop)
        if stopped and finish_reason in ("stop", "length"):
            finish_reason = "stop"
    return ChatResult(
        job_id=job_id,
        model_id=loaded.manifest.repo_id,
        model_revision=loaded.manifest.commit,
        thinking=decode_part(loaded.tokenizer, split.thinking_ids, loaded.think),
        content=content,
        finish_reason=finish_reason,
        usage=Usage(prompt_tokens=len(prepared.engine_request.prompt_ids),
                    completion_tokens=completion, thinking_tokens=split.thinking_tokens,
                    cached_prompt_tokens=output.cached_prompt_tokens),
        timings=Timings(
            queued_at=_utc(submitted_at) if submitted_at else None,
            started_at=_utc(started_at),
            finished_at=_utc(finished_at),
            queue_wait_s=max(0.0, started_at - submitted_at) if submitted_at else None,
            batch_wait_s=output.batch_wait_s,
            first_token_s=(output.first_token_at - started_mono
                           if output.first_token_at is not None else None),
            generation_s=generation_s,
            tokens_per_s=completion / generation_s if generation_s > 0 else 0.0,
        ),
        worker_host=runtime.host,
        worker_name=runtime.worker_name,
        device=str(loaded.device),
    )




def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)
