"""The engine: one thread that owns the model and decodes the jobs of all task slots in batches.

Celery's unit of work is a task; a device's is a batch. Task slots (threads) submit requests
here and wait on a future; the engine gathers what is waiting into a left-padded batch, runs
its own decode loop (so each row can end on its own and later be streamed, cancelled or timed
out between steps), and resolves each row's future the moment that row ends.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from worker.pipeline.reasoning import ThinkTokens
from worker.pipeline.sampling import SamplingParams, sample_token

log = logging.getLogger(__name__)


class DeviceOutOfMemory(RuntimeError):
    """The job does not fit on the device even alone."""


class EngineStopped(RuntimeError):
    """The engine stopped (the worker is shutting down) before the job finished: the job is
    not at fault and can run again elsewhere."""


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


@dataclass(eq=False)  # compared and hashed by identity: a job is one thing in flight
class EngineJob:
    """One job in the engine. Other threads may read `generated` (append-only) and call
    `cancel()`; the engine thread does everything else."""

    request: EngineRequest
    future: Future[EngineOutput] = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # when its prefill began
    first_token_at: float | None = None
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    peak_batch: int = 0
    cancelled: bool = False
    thinking: bool = False
    thinking_tokens: int = 0
    forced: list[int] = field(default_factory=list)

    def cancel(self) -> None:
        """Ask the engine to end this job; it does so before its next decode step."""
        self.cancelled = True

    def interrupted(self, now: float) -> FinishReason | None:
        if self.cancelled:
            return "cancelled"
        if self.request.deadline is not None and now >= self.request.deadline:
            return "timeout"
        return None

    def finish(self, reason: FinishReason) -> None:
        if not self.future.done():
            waited = (self.admitted_at or time.monotonic()) - self.submitted_at
            self.future.set_result(EngineOutput(list(self.generated), reason, self.peak_batch,
                                                max(0.0, waited), self.first_token_at))


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 65_536
    batch_wait_s: float = 0.005


class Engine:
    def __init__(self, model: Any, *, pad_id: int, limits: EngineLimits,
                 think: ThinkTokens | None = None) -> None:
        self.model = model
        self.device = model.device
        self.pad_id = pad_id
        self.think = think or ThinkTokens(open_id=None, close_id=None)
        self.limits = limits
        self._inbox: queue.Queue[EngineJob] = queue.Queue()
        self._carry: list[EngineJob] = []  # taken from the inbox, not yet admitted
        self._row_cap = limits.max_batch_size  # lowered after a device OOM until the backlog drains
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="chatqueue-engine", daemon=True)

    # --- the interface task slots use
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> EngineJob:
        if self._stop.is_set():
            raise EngineStopped("the engine is stopped")
        job = EngineJob(request=request)
        self._inbox.put(job)
        return job

    def generate(self, request: EngineRequest) -> EngineOutput:
        return self.submit(request).future.result()

    # --- the engine thread
    def _serve(self) -> None:
        batch: _Batch | None = None
        while not self._stop.is_set():
            newcomers = self._admit(batch)
            try:
                if newcomers:
                    batch = self._join(batch, newcomers)
                if batch is not None and batch.rows:
                    self._step(batch)
            except torch.OutOfMemoryError:
                batch = self._recover_from_oom(batch, newcomers)
            except Exception as exc:  # a bug must fail its jobs, not the engine thread
                log.exception("decode step failed")
                for row in (batch.rows if batch else []) + newcomers:
                    if not row.future.done():
                        row.future.set_exception(exc)
                batch = None
            if batch is not None and not batch.rows:
                batch = None
        for row in self._carry + _drain(self._inbox) + (batch.rows if batch else []):
            if not row.future.done():
                row.future.set_exception(
                    EngineStopped("the engine stopped before the job finished"))

    def _admit(self, batch: _Batch | None) -> list[EngineJob]:
        """The rows to add now, oldest first, within the row cap and the token bound."""
        running = batch.rows if batch else []
        waiting, self._carry = self._carry, []
        if not running and not waiting:
            self._row_cap = self.limits.max_batch_size  # the backlog after an OOM has drained
            try:
                waiting = [self._inbox.get(timeout=0.1)]
            except queue.Empty:
                return []
        # Idle: let a burst gather so it is prefilled in one forward. Running: never stall.
        deadline = time.monotonic() + (0.0 if running else self.limits.batch_wait_s)
        while len(running) + len(waiting) < self._row_cap:
            try:
                waiting.append(self._inbox.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        admitted: list[EngineJob] = []
        for i, row in enumerate(waiting):
            rows = [*running, *admitted, row]
            if len(rows) > self._row_cap or (len(rows) > 1 and not self._fits(rows)):
                self._carry = waiting[i:]
                break
            admitted.append(row)
        return admitted

    def _fits(self, rows: list[EngineJob]) -> bool:
        # Left padding makes every row as long as the longest prompt plus the longest budget.
        longest_prompt = max(len(r.request.prompt_ids) for r in rows)
        longest_new = max(r.request.max_new_tokens for r in rows)
        return len(rows) * (longest_prompt + longest_new) <= self.limits.max_batch_tokens

    @torch.inference_mode()
    def _join(self, batch: _Batch | None, newcomers: list[EngineJob]) -> _Batch | None:
        """Prefill the newcomers, take their first tokens, and merge them into the running
        batch: caches and masks are left-padded to a common length, so every row keeps its own
        positions and sees only its own tokens."""
        now = time.monotonic()
        for job in newcomers:
            if (reason := job.interrupted(now)) is not None:
                job.finish(reason)  # cancelled or timed out while it waited: it never starts
        newcomers = [job for job in newcomers if not job.future.done()]
        if not newcomers:
            return batch
        for job in newcomers:
            job.generator = _generator_for(job.request.sampling, self.device)
            job.thinking = job.request.prompt_opened_thinking
            job.admitted_at = now
        for group in _similar_lengths(newcomers):
            fresh = self._prefill(group)
            if batch is None or not batch.rows:
                batch = fresh
            elif fresh.rows:
                batch = _merge(batch, fresh)
        return batch

    def _prefill(self, jobs: list[EngineJob]) -> _Batch:
        input_ids, mask = self._left_pad([job.request.prompt_ids for job in jobs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = _new_cache(self.model.config)
        logits = self._forward(input_ids, mask, positions, cache)
        fresh = _Batch(rows=jobs, cache=cache, mask=mask,
                       positions=positions[:, -1] + 1, pending=torch.zeros_like(positions[:, -1]))
        self._take_tokens(fresh, logits)
        return fresh

    @torch.inference_mode()
    def _step(self, batch: _Batch) -> None:
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=-1)
        logits = self._forward(batch.pending.unsqueeze(-1), batch.mask,
                               batch.positions.unsqueeze(-1), batch.cache)
        batch.positions = batch.positions + 1
        self._take_tokens(batch, logits)

    def _take_tokens(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Give each row its next token, end the rows that are done, drop them from the batch."""
        tokens = self._pick_tokens(logits, batch.rows)
        size, now = len(batch.rows), time.monotonic()
        keep = []
        for i, job in enumerate(batch.rows):
            if (reason := job.interrupted(now)) is not None:
                job.finish(reason)
                continue
            tokens[i] = self._steer(job, tokens[i])
            if not job.generated:
                job.first_token_at = now
            if not self._append(job, tokens[i], size):
                keep.append(i)
        batch.pending = torch.tensor(tokens, device=self.device)
        if len(keep) < size:
            _select(batch, keep)

    def _steer(self, job: EngineJob, token: int) -> int:
        """Apply the thinking budget: once spent, the think block is closed for the model the
        way its template writes it, and the model goes on to answer."""
        budget = job.request.thinking_budget
        if not job.forced and job.thinking and budget is not None and job.thinking_tokens >= budget:
            job.forced = list(job.request.close_thinking_ids)
        if job.forced:
            token = job.forced.pop(0)
        if token == self.think.open_id:
            job.thinking = True
        elif token == self.think.close_id:
            job.thinking = False
        elif job.thinking:
            job.thinking_tokens += 1
        return token

    def _recover_from_oom(self, batch: _Batch | None, newcomers: list[EngineJob]) -> None:
        """Put unfinished jobs back, halve the rows allowed; a job that fails alone is failed."""
        # A join can fail after merging some newcomers into the batch: count each job once.
        rows = dict.fromkeys((batch.rows if batch else []) + newcomers)
        pending = [row for row in rows if not row.future.done()]
        _release_device_memory(self.device)
        if len(pending) <= 1:
            for row in pending:
                request = row.request
                row.future.set_exception(DeviceOutOfMemory(
                    f"out of device memory for a job of {len(request.prompt_ids)} prompt tokens "
                    f"and max_new_tokens {request.max_new_tokens}, even alone on {self.device}"
                ))
            return None
        self._row_cap = max(1, len(pending) // 2)
        log.warning("device out of memory with %d rows; retrying them %d at a time",
                    len(pending), self._row_cap)
        for row in pending:
            row.generated.clear()
            row.peak_batch = 0
            row.admitted_at = None
        self._carry = pending + self._carry
        return None

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.logits[:, -1, :]

    def _left_pad(self, prompts: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt):] = 1
        return ids.to(self.device), mask.to(self.device)

    @staticmethod
    def _pick_tokens(logits: torch.Tensor, rows: list[EngineJob]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.request.sampling.do_sample:
                assert row.generator is not None
                tokens[i] = sample_token(logits[i], row.request.sampling, row.generator)
        return tokens

    @staticmethod
    def _append(row: EngineJob, token: int, batch_size: int) -> bool:
        """Record a token; True when the row has ended (its future is then resolved)."""
        row.generated.append(token)
        row.peak_batch = max(row.peak_batch, batch_size)
        if token in row.request.stop_ids:
            reason: FinishReason = "stop"
        elif len(row.generated) >= row.request.max_new_tokens:
            reason = "length"
        else:
            return False
        row.finish(reason)
        return True


@dataclass
class _Batch:
    """The rows being decoded and their shared state, row i of every tensor being rows[i]."""

    rows: list[EngineJob]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, cached positions]: 1 for a row's own tokens, 0 for padding
    positions: torch.Tensor  # [rows]: the position id of each row's next token
    pending: torch.Tensor  # [rows]: each row's last picked token, the next step's input


def _select(batch: _Batch, keep: list[int]) -> None:
    """Keep only the given rows, then drop the leading columns no remaining row uses."""
    index = torch.tensor(keep, device=batch.mask.device)
    batch.rows = [batch.rows[i] for i in keep]
    if not keep:
        return
    batch.cache.batch_select_indices(index)
    batch.mask, batch.positions, batch.pending = (
        batch.mask[index], batch.positions[index], batch.pending[index])
    used = batch.mask.any(dim=0).nonzero()
    first = int(used[0]) if len(used) else 0
    if first > 0:
        batch.mask = batch.mask[:, first:]
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into a larger buffer.

    transformers' DynamicLayer appends a step's keys with torch.cat, copying the whole cache of
    the batch at every decode step; here a step writes in place and the buffer grows in chunks.
    When the engine replaces `keys` / `values` itself (dropping finished rows, merging new
    ones, trimming padding), the next update adopts the new tensors into a fresh buffer.
    """

    GROWTH = 256  # positions added per reallocation

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        if not self._owns_current() or needed > self._key_buffer.shape[-2]:  # type: ignore[union-attr]
            self._key_buffer = self._adopt(self.keys, key_states, needed)
            self._value_buffer = self._adopt(self.values, value_states, needed)
        assert self._key_buffer is not None and self._value_buffer is not None
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _owns_current(self) -> bool:
        return (self._key_buffer is not None and self.keys.numel() > 0
                and self.keys.data_ptr() == self._key_buffer.data_ptr()
                and self.keys.shape[0] == self._key_buffer.shape[0])

    def _adopt(self, current: torch.Tensor, incoming: torch.Tensor, needed: int) -> torch.Tensor:
        shape = list(incoming.shape)
        shape[-2] = needed + self.GROWTH
        buffer = incoming.new_empty(shape)
        if current.numel():
            buffer[..., : current.shape[-2], :] = current
        return buffer


def _new_cache(config: Any) -> DynamicCache:
    cache = DynamicCache(config=config)
    # Only plain full-attention layers grow in place; sliding-window ones keep their own logic.
    if all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_GrowingLayer() for _ in cache.layers]
    return cache


def _similar_lengths(jobs: list[EngineJob], spread: float = 1.25) -> list[list[EngineJob]]:
    """Prefill groups whose longest prompt is at most `spread` x their shortest: padding a
    20-token prompt to 400 would spend 20x its own compute; separate prefills waste nothing
    and the merge pads only the cache, which costs memory, not matmuls."""
    groups: list[list[EngineJob]] = []
    for job in sorted(jobs, key=lambda j: len(j.request.prompt_ids)):
        length = len(job.request.prompt_ids)
        if groups and length <= spread * len(groups[-1][0].request.prompt_ids):
            groups[-1].append(job)
        else:
            groups.append([job])
    return groups


def _merge(old: _Batch, new: _Batch) -> _Batch:
    width = max(old.mask.shape[1], new.mask.shape[1])
    for old_layer, new_layer in zip(old.cache.layers, new.cache.layers, strict=True):
        old_layer.keys = torch.cat([_pad_left(old_layer.keys, width, dim=-2),
                                    _pad_left(new_layer.keys, width, dim=-2)], dim=0)
        old_layer.values = torch.cat([_pad_left(old_layer.values, width, dim=-2),
                                      _pad_left(new_layer.values, width, dim=-2)], dim=0)
    old.mask = torch.cat([_pad_left(old.mask, width, dim=-1), _pad_left(new.mask, width, dim=-1)])
    old.rows = old.rows + new.rows
    old.positions = torch.cat([old.positions, new.positions])
    old.pending = torch.cat([old.pending, new.pending])
    return old


def _pad_left(tensor: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


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
    rows = []
    while True:
        try:
            rows.append(inbox.get_nowait())
        except queue.Empty:
            return rows
