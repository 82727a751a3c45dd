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

from worker.pipeline.sampling import SamplingParams, sample_token

log = logging.getLogger(__name__)


class DeviceOutOfMemory(RuntimeError):
    """The job does not fit on the device even alone."""


@dataclass(frozen=True)
class EngineRequest:
    prompt_ids: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams
    stop_ids: frozenset[int]

    @property
    def token_budget(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


@dataclass(frozen=True)
class EngineOutput:
    token_ids: list[int]
    finish_reason: Literal["stop", "length"]
    batch_size: int


@dataclass
class _Row:
    request: EngineRequest
    future: Future[EngineOutput]
    generated: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@dataclass(frozen=True)
class EngineLimits:
    max_batch_size: int = 32
    max_batch_tokens: int = 65_536
    batch_wait_s: float = 0.005


class Engine:
    def __init__(self, model: Any, *, pad_id: int, limits: EngineLimits) -> None:
        self.model = model
        self.device = model.device
        self.pad_id = pad_id
        self.limits = limits
        self._inbox: queue.Queue[_Row] = queue.Queue()
        self._carry: list[_Row] = []  # taken from the inbox but left for the next batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="chatqueue-engine", daemon=True)

    # --- the interface task slots use
    def start(self) -> Engine:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, request: EngineRequest) -> Future[EngineOutput]:
        if self._stop.is_set():
            raise RuntimeError("engine is stopped")
        row = _Row(request=request, future=Future())
        self._inbox.put(row)
        return row.future

    def generate(self, request: EngineRequest) -> EngineOutput:
        return self.submit(request).result()

    # --- the engine thread
    def _serve(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            if batch:
                self._run(batch)
        for row in self._carry + _drain(self._inbox):
            row.future.set_exception(RuntimeError("engine stopped before the job ran"))

    def _next_batch(self) -> list[_Row]:
        """Wait for one request, then let the batch fill for batch_wait_s within the limits."""
        batch, self._carry = self._carry, []
        if not batch:
            try:
                batch = [self._inbox.get(timeout=0.1)]
            except queue.Empty:
                return []
        deadline = time.monotonic() + self.limits.batch_wait_s
        while len(batch) < self.limits.max_batch_size:
            try:
                row = self._inbox.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not self._fits([*batch, row]):
                self._carry.append(row)
                break
            batch.append(row)
        return batch

    def _fits(self, rows: list[_Row]) -> bool:
        # Left padding makes every row as long as the longest prompt plus the longest budget.
        longest_prompt = max(len(r.request.prompt_ids) for r in rows)
        longest_new = max(r.request.max_new_tokens for r in rows)
        return len(rows) * (longest_prompt + longest_new) <= self.limits.max_batch_tokens

    def _run(self, rows: list[_Row]) -> None:
        """Decode a batch; on a device OOM, split it and retry the halves before failing a job."""
        try:
            self._decode(rows)
        except torch.OutOfMemoryError:
            pending = [row for row in rows if not row.future.done()]
            _release_device_memory(self.device)
            if len(pending) == 1:
                request = pending[0].request
                pending[0].future.set_exception(DeviceOutOfMemory(
                    f"out of device memory for a job of {len(request.prompt_ids)} prompt tokens "
                    f"and max_new_tokens {request.max_new_tokens}, even alone on {self.device}"
                ))
                return
            log.warning("device out of memory with a batch of %d; retrying in halves", len(pending))
            for row in pending:
                row.generated.clear()
            half = len(pending) // 2
            self._run(pending[:half])
            self._run(pending[half:])
        except Exception as exc:  # a bug must fail its jobs, not the engine thread
            log.exception("batch of %d failed", len(rows))
            for row in rows:
                if not row.future.done():
                    row.future.set_exception(exc)

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        for row in rows:
            row.generator = _generator_for(row.request.sampling, self.device)
        batch_size = len(rows)
        input_ids, attention_mask = self._left_pad([r.request.prompt_ids for r in rows])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(input_ids, attention_mask, position_ids, cache)
        next_position = position_ids[:, -1] + 1
        while True:
            tokens = self._pick_tokens(logits, rows)
            keep = [i for i, (row, token) in enumerate(zip(rows, tokens, strict=True))
                    if not self._append(row, token, batch_size)]
            if not keep:
                return
            if len(keep) < len(rows):
                # Drop finished rows so the device no longer computes them.
                index = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(index)
                attention_mask, next_position = attention_mask[index], next_position[index]
                rows, tokens = [rows[i] for i in keep], [tokens[i] for i in keep]
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((len(rows), 1))], dim=-1
            )
            step_ids = torch.tensor(tokens, device=self.device).unsqueeze(-1)
            logits = self._forward(step_ids, attention_mask, next_position.unsqueeze(-1), cache)
            next_position = next_position + 1

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
    def _pick_tokens(logits: torch.Tensor, rows: list[_Row]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if row.request.sampling.do_sample:
                assert row.generator is not None
                tokens[i] = sample_token(logits[i], row.request.sampling, row.generator)
        return tokens

    @staticmethod
    def _append(row: _Row, token: int, batch_size: int) -> bool:
        """Record a token; True when the row has ended (its future is then resolved)."""
        row.generated.append(token)
        if token in row.request.stop_ids:
            reason: Literal["stop", "length"] = "stop"
        elif len(row.generated) >= row.request.max_new_tokens:
            reason = "length"
        else:
            return False
        row.future.set_result(EngineOutput(list(row.generated), reason, batch_size))
        return True


def _generator_for(sampling: SamplingParams, device: torch.device) -> torch.Generator | None:
    # One generator per row: a seeded job samples the same tokens whatever shares its batch.
    if not sampling.do_sample:
        return None
    seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def _release_device_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _drain(inbox: queue.Queue[_Row]) -> list[_Row]:
    rows = []
    while True:
        try:
            rows.append(inbox.get_nowait())
        except queue.Empty:
            return rows
