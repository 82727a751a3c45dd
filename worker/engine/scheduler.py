"""What runs in the next step: which rows decode, which prompts prefill and how much of them.

vLLM v1's scheduler, small: there is no prefill phase and decode phase, only jobs whose known
tokens (prompt, then generated) are ahead of what the KV cache holds. Each step:

1. every running row, oldest first, computes its next tokens: one for a decoding row, a chunk
   for a prompt still being prefilled, within the step's token budget (`max_step_tokens`), and
   always leaving one token of it to each row after it so that decoding never stalls;
2. when a row needs a block and the pool is empty, the newest running row is preempted: its
   blocks are freed and it waits to be recomputed later (its generated tokens are kept, so its
   output does not change); a row that cannot fit even alone fails with DeviceOutOfMemory;
3. then waiting jobs are admitted in `admission_key` order while rows, budget and blocks last;
   a prompt's blocks already in the prefix cache are taken instead of computed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.engine.job import DeviceOutOfMemory, EngineJob, EngineLimits
from worker.engine.kv_cache import KVCacheManager


@dataclass(frozen=True)
class ScheduledRow:
    job: EngineJob
    start: int  # the first position computed this step
    count: int  # how many positions

    @property
    def samples(self) -> bool:
        """The row's last known token is computed this step: its logits pick the next one."""
        return self.start + self.count == len(self.job.tokens)


@dataclass
class SchedulerOutput:
    rows: list[ScheduledRow] = field(default_factory=list)
    preempted: list[EngineJob] = field(default_factory=list)


def admission_key(job: EngineJob) -> tuple[float, ...]:
    """Waiting jobs are admitted in ascending order of this key: the highest priority first,
    then the oldest."""
    return (-job.request.priority, job.submitted_at)


class Scheduler:
    def __init__(self, kv: KVCacheManager, limits: EngineLimits) -> None:
        self.kv = kv
        self.limits = limits
        self.waiting: list[EngineJob] = []
        self.running: list[EngineJob] = []  # in admission order, oldest first
        self.row_cap = limits.max_batch_size  # lowered after a device OOM until idle

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def add(self, job: EngineJob) -> None:
        self.waiting.append(job)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.idle:
            self.row_cap = self.limits.max_batch_size  # the backlog after an OOM has drained
            return out
        budget = self.limits.max_step_tokens
        index = 0
        while index < len(self.running):
            job = self.running[index]
            later = len(self.running) - index - 1
            count = max(1, min(len(job.tokens) - job.num_computed, budget - later))
            if not self._make_room(job, count, index, out):
                continue  # the job left the running list (preempted or failed)
            out.rows.append(ScheduledRow(job, job.num_computed, count))
            budget -= count
            index += 1
        if not out.preempted:
            self._admit(budget, out)
        return out

    def _make_room(self, job: EngineJob, count: int, index: int, out: SchedulerOutput) -> bool:
        while not self.kv.allocate(job, job.num_computed + count):
            if len(self.running) - 1 > index:  # a newer row gives its blocks back
                out.preempted.append(self.preempt(self.running[-1]))
            elif index == 0:  # alone and still too big for the pool
                self.running.pop(index)
                self.kv.free(job)
                job.fail(self.too_big(job, f"a KV cache of {self.kv.num_blocks} blocks"))
                return False
            else:  # it is itself the newest row
                out.preempted.append(self.preempt(job))
                return False
        return True

    def _admit(self, budget: int, out: SchedulerOutput) -> None:
        self.waiting.sort(key=admission_key)
        in_flight = sum(job.request.token_budget for job in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.row_cap:
            job = self.waiting[0]
            if self.running and in_flight + job.request.token_budget > self.limits.max_batch_tokens:
                break
            if self.kv.blocks_for(len(job.tokens) + 1) > self.kv.num_blocks:
                self.waiting.pop(0)
                job.fail(self.too_big(job, f"a KV cache of {self.kv.num_blocks} blocks"))
                continue
            hit = self.kv.match_prefix(job)
            count = min(len(job.tokens) - hit, budget)
            if not self.kv.allocate(job, hit + count):
                self.kv.free(job)
                break
            self.waiting.pop(0)
            job.num_computed = hit
            if job.admitted_at is None:
                job.admitted_at = time.monotonic()
                job.cached_prompt_tokens = min(hit, len(job.request.prompt_ids))
            self.running.append(job)
            out.rows.append(ScheduledRow(job, hit, count))
            budget -= count
            in_flight += job.request.token_budget

    def preempt(self, job: EngineJob) -> EngineJob:
        """Free the row's blocks and send it back to wait; it is recomputed when readmitted."""
        self.running.remove(job)
        self.kv.free(job)
        job.num_computed = 0
        job.preemptions += 1
        self.waiting.append(job)
        return job

    def finish(self, job: EngineJob) -> None:
        """The job has ended (its future is resolved): drop it and free its blocks now."""
        if job in self.running:
            self.running.remove(job)
        elif job in self.waiting:
            self.waiting.remove(job)
        self.kv.free(job)

    def shrink_after_oom(self, rows: int) -> None:
        """The device ran out of memory on a step of `rows` rows: halve the rows allowed and
        preempt the newest rows beyond that."""
        self.row_cap = max(1, rows // 2)
        while len(self.running) > self.row_cap:
            self.preempt(self.running[-1])

    @staticmethod
    def too_big(job: EngineJob, room: str) -> DeviceOutOfMemory:
        request = job.request
        return DeviceOutOfMemory(
            f"out of device memory for a job of {len(request.prompt_ids)} prompt tokens and "
            f"max_new_tokens {request.max_new_tokens}, even alone ({room})")
