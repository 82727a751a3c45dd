"""What flows through the engine: a request, the job that carries it, its output, the limits."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

# The engine's errors are worker/errors.py's (one hierarchy); kept importable from here.
from worker.errors import DeviceOutOfMemory as DeviceOutOfMemory
from worker.errors import EngineStopped as EngineStopped
from worker.pipeline.sampling import SamplingParams

FinishReason = Literal["stop", "length", "cancelled", "timeout"]


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]
    deadline: float | None = None  # time.monotonic() after which the job ends with "timeout"
    thinking_budget: int | None = None  # thinking tokens after which the think block is closed
    close_thinking_ids: tuple[int, ...] = ()  # what closes it, as the chat template writes it
    prompt_opened_thinking: bool = False
    # True once the generated ids hold a stop string (decoding is the caller's: the engine
    # knows no text). Called on the engine thread after every token.
    stop_text: Callable[[Sequence[int]], bool] | None = None
    priority: int = 0  # higher is admitted first

    @property
    def token_budget(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class EngineOutput:
    token_ids: list[int]
    finish_reason: FinishReason
    batch_size: int  # the most rows this job shared the device with, itself included
    batch_wait_s: float = 0.0  # submitted -> its prefill began (waiting for a row in the batch)
    first_token_at: float | None = None  # time.monotonic() when its first token was picked
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 32  # rows decoded together
    max_batch_tokens: int = 65_536  # bound on the rows' (prompt + max new tokens) in flight
    batch_wait_s: float = 0.005  # when idle, how long a burst may gather before the first step
    max_step_tokens: int = 512  # tokens one forward computes: decode rows + prefill chunks
    block_size: int = 16  # token positions per KV-cache block
    prefix_caching: bool = True  # reuse the KV of prompt prefixes computed before
    kv_cache_bytes: int | None = None  # CPU: the KV pool's size (None: min(2 GiB, what's needed))
    kv_cache_memory_fraction: float = 0.8  # CUDA: share of free device memory after load
    native_kernels: bool = True  # CPU: the C decode attention kernel, when it builds
    kernel_cache_dir: Path | None = None  # where its builds are kept (None: native.cache_dirs())
    fast_path: bool = True  # CPU, Llama family: the engine's own forward (engine/fast_path.py)


@dataclass(eq=False)  # compared and hashed by identity: a job is one thing in flight
class EngineJob:
    """One job in the engine. Other threads may read `generated` and `picked_at` (append-only)
    and call `cancel()` or `interrupt()`; the engine thread does everything else, its outcome
    included."""

    request: EngineRequest
    future: Future[EngineOutput] = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when its prefill began
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    picked_at: list[float] = field(default_factory=list)  # time.time() each token was picked
    generator: torch.Generator | None = None
    peak_batch: int = 0
    cancelled: bool = False
    interruption: BaseException | None = None  # what the job's future is to fail with
    thinking: bool = False
    thinking_tokens: int = 0
    forced: list[int] = field(default_factory=list)
    # The engine thread's bookkeeping: every known token (prompt, then generated), how many of
    # them have their KV in the cache, how many prompt tokens the prefix cache supplied.
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_prompt_tokens: int = 0
    preemptions: int = 0

    def __post_init__(self) -> None:
        self.tokens = list(self.request.prompt_ids)

    def cancel(self) -> None:
        """Ask the engine to end this job; it does so before its next decode step."""
        self.cancelled = True

    def interrupt(self, error: BaseException) -> None:
        """Ask the engine to end this job with `error` (its future fails with it, which no
        finish reason says) before its next step; the first request stands. Only the engine
        thread resolves it, so no token lands on a job whose outcome is set."""
        if self.interruption is None:
            self.interruption = error

    @property
    def started(self) -> bool:
        return self.admitted_at is not None

    # The first outcome stands and a second is dropped: a check-then-set would race into
    # InvalidStateError (on the engine thread it would fail every row of the step) should two
    # threads ever end one job (the engine ends its jobs; `submit` fails orphans of a dead one).
    def finish(self, reason: FinishReason) -> None:
        waited = (self.admitted_at or time.monotonic()) - self.submitted_at
        with suppress(InvalidStateError):
            self.future.set_result(EngineOutput(
                list(self.generated), reason, self.peak_batch, max(0.0, waited),
                self.first_token_at, self.cached_prompt_tokens))

    def fail(self, error: BaseException) -> None:
        with suppress(InvalidStateError):
            self.future.set_exception(error)
