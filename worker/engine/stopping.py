"""Why a job ends: small pure callables of (job, now) -> a finish reason or None.

Interruptions are checked before every step (a cancelled or timed-out job computes nothing
more, and one that never started ends without a token); token checks after each new token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from worker.engine.job import EngineJob, FinishReason

StopCheck = Callable[[EngineJob, float], FinishReason | None]


def cancelled(job: EngineJob, now: float) -> FinishReason | None:
    return "cancelled" if job.cancelled else None


def past_deadline(job: EngineJob, now: float) -> FinishReason | None:
    deadline = job.request.deadline
    return "timeout" if deadline is not None and now >= deadline else None


def stop_token(job: EngineJob, now: float) -> FinishReason | None:
    return "stop" if job.generated and job.generated[-1] in job.request.stop_ids else None


def stop_string(job: EngineJob, now: float) -> FinishReason | None:
    check = job.request.stop_text
    return "stop" if check is not None and check(job.generated) else None


def length(job: EngineJob, now: float) -> FinishReason | None:
    return "length" if len(job.generated) >= job.request.max_new_tokens else None


INTERRUPTIONS: tuple[StopCheck, ...] = (cancelled, past_deadline)
AFTER_TOKEN: tuple[StopCheck, ...] = (stop_token, stop_string, length)


def first_reason(checks: Sequence[StopCheck], job: EngineJob, now: float) -> FinishReason | None:
    for check in checks:
        if (reason := check(job, now)) is not None:
            return reason
    return None
