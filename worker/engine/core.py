"""The engine core: one thread that owns the model and steps the jobs of all task slots.

Celery's unit of work is a task; a device's is a batch. Task slots (threads) submit requests
and wait on a future. The engine thread composes a scheduler (what runs this step), a KV-cache
manager (which blocks hold whose keys and values) and a model runner (one forward over the
step's ragged batch), picks each sampling row's next token, and resolves a job's future the
moment it ends, so each job can be streamed, cancelled or timed out between steps.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from worker import openmp
from worker.engine import stopping
from worker.engine.job import (
    DeviceOutOfMemory,
    EngineJob,
    EngineLimits,
    EngineOutput,
    EngineRequest,
    EngineStopped,
)
from worker.engine.kv_cache import KVCacheManager, pool_blocks
from worker.engine.runner import ModelRunner
from worker.engine.scheduler import ScheduledRow, Scheduler
from worker.pipeline.reasoning import ThinkTokens, advance_thinking, close_for_budget
from worker.pipeline.sampling import SamplingParams, sample_batch

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: Any, *, pad_id: int, limits: EngineLimits,
                 think: ThinkTokens | None = None) -> None:
        self.model = model
        self.device = model.device
        self.pad_id = pad_id  # ragged batches need no padding; kept for the callers' interface
        self.think = think or ThinkTokens(open_id=None, close_id=None)
        self.limits = limits
        dtype = getattr(model, "dtype", None) or torch.get_default_dtype()
        num_blocks = pool_blocks(
            model.config, dtype, self.device, block_size=limits.block_size,
            kv_cache_bytes=limits.kv_cache_bytes,
            memory_fraction=limits.kv_cache_memory_fraction,
            wanted_tokens=limits.max_batch_tokens + limits.max_step_tokens)
        self.kv = KVCacheManager(num_blocks, limits.block_size,
                                 prefix_caching=limits.prefix_caching)
        self.scheduler = Scheduler(self.kv, limits)
        self.runner = ModelRunner(model, self.kv, native_kernels=limits.native_kernels,
                                  kernel_cache_dir=limits.kernel_cache_dir,
                                  fast_path=limits.fast_path)
        self._inbox: queue.Queue[EngineJob] = queue.Queue()
        self._stop = threading.Event()
        # Whether this thread ran parallel CPU ops since it last freed its OpenMP team.
        self._holds_team = False
        self._stop_requested = False
        self._step_listeners: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name="chatqueue-engine", daemon=True)

    # --- the interface task slots use
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop_requested = True
        self._stop.set()
        self._thread.join(timeout)

    def on_step(self, listener: Callable[[], None]) -> None:
        """Call `listener` on the engine thread after each step that picked tokens or ended a
        job (the worker's relay: it must only take note and return, never wait)."""
        self._step_listeners.append(listener)

    def submit(self, request: EngineRequest) -> EngineJob:
        if self._stop.is_set():
            raise EngineStopped("the engine is stopped")
        job = EngineJob(request=request, thinking=request.prompt_opened_thinking)
        self._inbox.put(job)
        if not self._thread.is_alive() and self._stop.is_set():
            # The thread ended between the check above and the put: nobody will take it.
            for orphan in _drain(self._inbox):
                orphan.fail(EngineStopped("the engine is stopped"))
        return job

    def generate(self, request: EngineRequest) -> EngineOutput:
        return self.submit(request).future.result()

    def wait_ended(self, timeout: float | None = None) -> bool:
        """Block until the engine thread has ended (stopped, or died); False on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stop_requested(self) -> bool:
        """True once stop() was called: the thread's end is then no death."""
        return self._stop_requested

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            # Whatever ended the thread, no job may wait forever on a future nobody resolves:
            # every job it holds, and every later submit, gets EngineStopped (back to the queue).
            log.critical("the engine thread died", exc_info=True)
        finally:
            self._stop.set()  # later submits are refused
            self._fail_all(EngineStopped("the engine stopped before the job finished"))

    # --- the engine thread
    def _serve(self) -> None:
        while not self._stop.is_set():
            self._take_inbox()
            if self._end_interrupted():
                self._notify()
            plan = self.scheduler.schedule()
            if not plan.rows:
                continue
            self._holds_team = True
            try:
                if self._step(plan.rows):
                    self._notify()
            except torch.OutOfMemoryError:
                self._recover_from_oom(plan.rows)
            except Exception as exc:  # a bug must fail its jobs, not the engine thread
                log.exception("engine step failed")
                for row in plan.rows:
                    row.job.fail(exc)
                    self.scheduler.finish(row.job)
                self._notify()

    def _notify(self) -> None:
        for listener in self._step_listeners:
            try:
                listener()
            except Exception:  # a listener's bug must not stop the engine
                log.exception("engine step listener failed")

    def _fail_all(self, error: EngineStopped) -> None:
        for job in self.scheduler.running + self.scheduler.waiting + _drain(self._inbox):
            job.fail(error)
            self.scheduler.finish(job)

    def _take_inbox(self) -> None:
        scheduler = self.scheduler
        if scheduler.idle:
            try:
                scheduler.add(self._inbox.get(timeout=0.1))
            except queue.Empty:
                if self._holds_team:  # idle: another thread's CPU work may run unthrottled
                    openmp.release_thread_pool()
                    self._holds_team = False
                return
            # Idle: let a burst gather so that it starts in one step.
            deadline = time.monotonic() + self.limits.batch_wait_s
            while len(scheduler.waiting) < self.limits.max_batch_size:
                try:
                    scheduler.add(self._inbox.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
        for job in _drain(self._inbox):
            scheduler.add(job)

    def _end_interrupted(self) -> bool:
        now = time.monotonic()
        ended = False
        for job in self.scheduler.running + self.scheduler.waiting:
            if job.interruption is not None:  # e.g. a drain past its grace: no finish reason
                job.fail(job.interruption)
            elif (reason := stopping.first_reason(stopping.INTERRUPTIONS, job, now)) is not None:
                job.finish(reason)
            else:
                continue
            self.scheduler.finish(job)
            ended = True
        return ended

    def _step(self, rows: list[ScheduledRow]) -> bool:
        """One forward; True when it picked tokens."""
        for row in rows:
            if row.job.generator is None and row.job.request.sampling.do_sample:
                row.job.generator = _generator_for(row.job.request.sampling, self.device)
        sampling, logits = self.runner.execute(rows)
        size = len(rows)
        for row in rows:
            row.job.num_computed += row.count
            row.job.peak_batch = max(row.job.peak_batch, size)
            self.kv.cache_computed(row.job)
        if not sampling:
            return False
        jobs = [row.job for row in sampling]
        tokens = sample_batch(logits, [job.request.sampling for job in jobs],
                              [job.generator for job in jobs])
        now, wall = time.monotonic(), time.time()
        for job, token in zip(jobs, tokens, strict=True):
            token = self._steer(job, token)
            if not job.generated:
                job.first_token_at = now
            job.tokens.append(token)
            job.picked_at.append(wall)  # before `generated`: a reader of a token finds its time
            job.generated.append(token)
            if (reason := stopping.first_reason(stopping.AFTER_TOKEN, job, now)) is not None:
                job.finish(reason)
                self.scheduler.finish(job)
        return True

    def _steer(self, job: EngineJob, token: int) -> int:
        """Apply the thinking budget: once spent, the think block is closed for the model the
        way its template writes it, and the model goes on to answer. Thinking tokens are
        counted by worker.pipeline.reasoning's rule, the one usage.thinking_tokens uses."""
        if not job.forced and job.thinking:
            job.forced = close_for_budget(job.request.close_thinking_ids, self.think,
                                          spent=job.thinking_tokens,
                                          budget=job.request.thinking_budget)
        if job.forced:
            token = job.forced.pop(0)
        job.thinking, counted = advance_thinking(token, self.think, thinking=job.thinking)
        job.thinking_tokens += counted
        return token

    def _recover_from_oom(self, rows: list[ScheduledRow]) -> None:
        """Preempt the newest rows and halve the rows allowed; a job that fails alone fails."""
        _release_device_memory(self.device)
        if len(rows) <= 1:
            for row in rows:
                row.job.fail(self.scheduler.too_big(row.job, f"on {self.device}"))
                self.scheduler.finish(row.job)
            return
        self.scheduler.shrink_after_oom(len(rows))
        log.warning("device out of memory with %d rows; retrying them %d at a time",
                    len(rows), self.scheduler.row_cap)


def _generator_for(sampling: SamplingParams, device: torch.device) -> torch.Generator | None:
    # One generator per row: a seeded job samples the same tokens whatever shares its batch.
    if not sampling.do_sample:
        return None
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _drain(inbox: queue.Queue[EngineJob]) -> list[EngineJob]:
    jobs = []
    while True:
        try:
            jobs.append(inbox.get_nowait())
        except queue.Empty:
            return jobs


__all__ = ["DeviceOutOfMemory", "Engine"]
