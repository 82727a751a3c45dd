"""The scheduler alone: admission order, the step's token budget, chunked prefill, preemption."""

from __future__ import annotations

import pytest

from worker.engine import scheduler as scheduling
from worker.engine.job import DeviceOutOfMemory, EngineJob, EngineLimits, EngineRequest
from worker.engine.kv_cache import KVCacheManager
from worker.engine.scheduler import Scheduler
from worker.pipeline.sampling import SamplingParams


def job(prompt_len, max_new=8, submitted_at=0.0, first=0):
    request = EngineRequest(list(range(first, first + prompt_len)), max_new,
                            SamplingParams(do_sample=False), frozenset())
    return EngineJob(request, submitted_at=submitted_at)


def scheduler(num_blocks=64, block_size=4, **limits):
    return Scheduler(KVCacheManager(num_blocks, block_size), EngineLimits(**limits))


def advance(s, out, token=0):
    """What the engine does after a step: computed positions advance, samplers get a token."""
    for row in out.rows:
        row.job.num_computed += row.count
        s.kv.cache_computed(row.job)
        if row.samples:
            row.job.tokens.append(token)
            row.job.generated.append(token)


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode():
    s = scheduler(max_step_tokens=10)
    short, long = job(3, submitted_at=1), job(25, submitted_at=2)
    s.add(long)
    s.add(short)
    out = s.schedule()
    # Oldest first: the short job's whole prompt, then what is left of the budget.
    assert [(r.job, r.start, r.count) for r in out.rows] == [(short, 0, 3), (long, 0, 7)]
    assert [r.samples for r in out.rows] == [True, False]
    advance(s, out)
    out = s.schedule()
    assert [(r.job, r.start, r.count) for r in out.rows] == [(short, 3, 1), (long, 7, 9)]
    advance(s, out)
    out = s.schedule()
    assert [(r.job, r.start, r.count) for r in out.rows] == [(short, 4, 1), (long, 16, 9)]
    assert out.rows[1].samples  # the prompt's last chunk: its logits pick the first token


def test_each_running_row_keeps_a_token_of_the_budget():
    s = scheduler(max_step_tokens=4)
    long, a, b = job(30, submitted_at=1), job(2, submitted_at=2), job(2, submitted_at=3)
    for j in (long, a, b):
        s.add(j)
    advance(s, s.schedule())  # long 0..4; a and b wait for budget
    assert s.running == [long]
    s.running += [a, b]  # as if admitted and prefilled earlier
    s.waiting.clear()
    for j in (a, b):
        s.kv.allocate(j, 2)
        j.num_computed = 2
    out = s.schedule()
    assert [(r.job, r.count) for r in out.rows] == [(long, 2), (a, 1), (b, 1)]


def test_admission_order_is_the_admission_key(monkeypatch):
    s = scheduler(max_batch_size=1)
    older, newer = job(3, submitted_at=1.0), job(3, submitted_at=2.0)
    s.add(newer)
    s.add(older)
    assert [r.job for r in s.schedule().rows] == [older]

    # A priority plugs in at one place: here, the newest first.
    monkeypatch.setattr(scheduling, "admission_key", lambda j: (-j.submitted_at,))
    s = scheduler(max_batch_size=1)
    s.add(older)
    s.add(newer)
    assert [r.job for r in s.schedule().rows] == [newer]


def test_rows_and_tokens_in_flight_bound_admission():
    s = scheduler(max_batch_size=2)
    jobs = [job(3, submitted_at=i) for i in range(3)]
    for j in jobs:
        s.add(j)
    assert [r.job for r in s.schedule().rows] == jobs[:2]

    s = scheduler(max_batch_tokens=20)
    big, small = job(10, max_new=8, submitted_at=0), job(3, max_new=8, submitted_at=1)
    s.add(big)
    s.add(small)
    assert [r.job for r in s.schedule().rows] == [big]  # 18 + 11 > 20


def test_when_blocks_run_out_the_newest_row_is_preempted_and_comes_back():
    s = scheduler(num_blocks=4, block_size=4, prefix_caching=False)
    old, new = job(4, submitted_at=1), job(4, submitted_at=2, first=100)
    s.add(old)
    s.add(new)
    out = s.schedule()
    assert len(out.rows) == 2 and s.kv.free_blocks == 2  # a block each for the prompts
    advance(s, out)
    advance(s, s.schedule())  # position 4 of each: a second block each, the pool is empty
    assert s.kv.free_blocks == 0
    for _ in range(3):  # positions 5..7 fit in the second blocks
        advance(s, s.schedule())
    out = s.schedule()  # position 8 needs a third block: the newest row gives its own back
    assert out.preempted == [new] and s.waiting == [new] and new.num_computed == 0
    assert [r.job for r in out.rows] == [old]
    assert new.tokens == [*range(100, 104), *new.generated] and len(new.generated) == 5  # kept


def test_a_job_bigger_than_the_pool_fails_alone():
    s = scheduler(num_blocks=2, block_size=4)
    big = job(12)
    s.add(big)
    assert s.schedule().rows == []
    with pytest.raises(DeviceOutOfMemory, match="12 prompt tokens"):
        big.future.result(timeout=0)
    assert s.idle


def test_an_oom_halves_the_rows_and_preempts_the_newest():
    s = scheduler()
    jobs = [job(3, submitted_at=i) for i in range(4)]
    for j in jobs:
        s.add(j)
    s.schedule()
    s.shrink_after_oom(4)
    assert s.running == jobs[:2] and set(s.waiting) == set(jobs[2:])
    assert s.schedule().rows and s.running == jobs[:2]  # the cap holds until idle
