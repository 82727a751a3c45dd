"""The engine without Celery: batched decoding equals one-at-a-time decoding, row by row."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from producer.schemas import ChatRequest
from worker.drain import Drain
from worker.engine import DeviceOutOfMemory, Engine, EngineLimits, EngineRequest, EngineStopped
from worker.engine.kv_cache import kv_bytes_per_token
from worker.engine.runner import current_step
from worker.errors import JobInterrupted
from worker.manifest import read_manifest
from worker.model import load_model
from worker.pipeline.sampling import SamplingParams
from worker.service import build_prompt_ids

GREEDY = SamplingParams(do_sample=False)
QUESTIONS = [
    "Hi",
    "Who are you?",
    "Please tell me, in some detail, how a batching engine for language models decides "
    "which requests to run together, and why left padding is needed at all.",
    "What is 2 + 2?",
    "数一数：一、二、三、四、五、六、七、八、九、十。",
]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, read_manifest(tiny_model_dir),
                      device=torch.device("cpu"), dtype="float32")


@pytest.fixture(params=["fast", "native", "torch"])
def engine(loaded, request):
    """Each test runs on the three CPU paths: the Llama family's fast path with the native
    attention kernels (what a CPU worker on this model uses), transformers' forward with those
    kernels, and transformers' forward with pure-torch attention (CUDA's shape of the code, and
    the fallback)."""
    # A generous wait lets every submitted request land in one batch.
    engine = Engine(loaded.model, pad_id=loaded.pad_id,
                    limits=EngineLimits(max_batch_size=8, batch_wait_s=0.5))
    assert engine.runner.fast_path is not None, "the fast path does not take the tiny Qwen3"
    assert engine.runner.native_decode, "the native CPU attention kernel did not build"
    engine.runner.use_fast_path = request.param == "fast"
    engine.runner.native_decode = engine.runner.native_prefill = request.param != "torch"
    engine.start()
    yield engine
    engine.stop()


def requests_for(loaded, sampling=GREEDY, max_new=(12, 20, 7, 16, 24)):
    return [
        EngineRequest(
            prompt_ids=build_prompt_ids(loaded, ChatRequest.model_validate(
                {"messages": [{"role": "user", "content": question}]})),
            max_new_tokens=budget, sampling=sampling, stop_ids=frozenset(),
        )
        for question, budget in zip(QUESTIONS, max_new, strict=True)
    ]


def test_batched_greedy_equals_one_at_a_time(loaded, engine):
    requests = requests_for(loaded)
    assert len({len(r.prompt_ids) for r in requests}) == len(requests)  # different lengths

    alone = [engine.generate(request) for request in requests]
    futures = [engine.submit(request).future for request in requests]
    together = [future.result() for future in futures]

    assert [out.batch_size for out in alone] == [1] * len(requests)
    assert max(out.batch_size for out in together) > 1
    for request, one, batched in zip(requests, alone, together, strict=True):
        assert batched.token_ids == one.token_ids
        assert len(batched.token_ids) == request.max_new_tokens
        assert batched.finish_reason == "length"


def test_engine_matches_transformers_generate(loaded, engine):
    request = requests_for(loaded)[2]
    reference = loaded.model.generate(
        torch.tensor([list(request.prompt_ids)]), max_new_tokens=request.max_new_tokens,
        do_sample=False, eos_token_id=None, pad_token_id=loaded.pad_id,
    )[0, len(request.prompt_ids):].tolist()

    assert engine.generate(request).token_ids == reference


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(loaded, engine):
    seeded = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=1234)
    request = requests_for(loaded, sampling=seeded)[1]
    alone = engine.generate(request)

    others = [engine.submit(r).future for r in requests_for(loaded)]
    again = engine.submit(request).future
    assert again.result().batch_size > 1
    assert again.result().token_ids == alone.token_ids
    for other in others:
        other.result()


def test_stop_token_ends_a_row_early_and_others_continue(loaded, engine):
    requests = requests_for(loaded)
    first_token = engine.generate(requests[0]).token_ids[0]
    stopping = EngineRequest(requests[0].prompt_ids, 50, GREEDY, frozenset({first_token}))

    futures = [engine.submit(stopping).future, *(engine.submit(r).future for r in requests[1:])]
    outputs = [future.result() for future in futures]

    assert outputs[0].finish_reason == "stop" and outputs[0].token_ids == [first_token]
    assert [len(o.token_ids) for o in outputs[1:]] == [r.max_new_tokens for r in requests[1:]]


def test_batches_respect_the_token_bound(loaded):
    # Every job's prompt + max_new_tokens is the same B; the bound is B: one job at a time.
    prompts = [len(r.prompt_ids) for r in requests_for(loaded)]
    budget = max(prompts) + 7
    requests = requests_for(loaded, max_new=[budget - n for n in prompts])
    engine = Engine(loaded.model, pad_id=loaded.pad_id,
                    limits=EngineLimits(max_batch_size=8, max_batch_tokens=budget,
                                        batch_wait_s=0.5)).start()
    try:
        outputs = [future.result() for future in [engine.submit(r).future for r in requests]]
    finally:
        engine.stop()
    assert [o.batch_size for o in outputs] == [1] * len(requests)
    # One row at a time: each job waited for a row while every job before it ran.
    waits = [o.batch_wait_s for o in outputs]
    assert waits == sorted(waits) and len(set(waits)) == len(waits), waits


def test_each_job_records_when_it_was_admitted_and_got_its_first_token(loaded, engine):
    request = requests_for(loaded)[0]
    job = engine.submit(request)
    output = job.future.result()
    assert job.admitted_at is not None and output.first_token_at is not None
    assert job.submitted_at <= job.admitted_at <= output.first_token_at <= time.monotonic()
    assert output.batch_wait_s == pytest.approx(job.admitted_at - job.submitted_at)

    # Past its deadline before it starts: it ends without a token.
    late = engine.submit(dataclasses.replace(request, deadline=time.monotonic() - 1)).future
    assert (late.result().finish_reason, late.result().first_token_at) == ("timeout", None)


def test_stopping_the_engine_fails_unfinished_jobs_with_engine_stopped(loaded):
    engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=EngineLimits()).start()
    request = requests_for(loaded, max_new=(4000, 20, 7, 16, 24))[0]
    job = engine.submit(request)
    wait_until(lambda: len(job.generated) > 0)
    engine.stop()

    with pytest.raises(EngineStopped):
        job.future.result(timeout=10)
    assert 0 < len(job.generated) < request.max_new_tokens
    with pytest.raises(EngineStopped):
        engine.submit(request)


def test_a_drain_past_its_grace_ends_the_job_on_the_engine_thread_between_steps(loaded):
    """The drain's timer fires while a step is under way: the job's outcome is set by the
    engine thread after that step's token, and no token lands on it once its future is done."""
    engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=EngineLimits()).start()
    drain, held = Drain(), threading.Event()
    execute = engine.runner.execute

    def execute_then_abandon(rows):
        out = execute(rows)
        if held.wait(timeout=30) and not drain.abandoning:
            # The timer fires mid-step (after the forward, before the step's tokens), on a
            # thread of its own as threading.Timer runs it; the step goes on once it is done.
            timer = threading.Thread(target=drain.abandon, name="drain-timer")
            timer.start()
            timer.join()
        return out

    engine.runner.execute = execute_then_abandon
    ended_with: list[tuple[str, int]] = []  # (thread, tokens) when the future was resolved
    try:
        job = engine.submit(requests_for(loaded, max_new=(4000, 20, 7, 16, 24))[0])
        job.future.add_done_callback(lambda _: ended_with.append(
            (threading.current_thread().name, len(job.generated))))
        with drain.hold(job):
            held.set()
            with pytest.raises(JobInterrupted, match="grace period"):
                job.future.result(timeout=60)
    finally:
        engine.stop()
    assert ended_with == [("chatqueue-engine", len(job.generated))]
    assert len(job.generated) == 1  # the step under way finished its token; none came after


def test_rows_joining_a_running_batch_decode_as_if_alone(loaded, engine):
    requests = requests_for(loaded, max_new=(120, 20, 7, 16, 24))
    alone = [engine.generate(request) for request in requests]

    first = engine.submit(requests[0]).future
    # Once the inbox is empty the first job is being decoded; the others must join it mid-flight.
    wait_until(lambda: engine._inbox.empty())
    assert not first.done()
    later = [engine.submit(request).future for request in requests[1:]]

    assert first.result().token_ids == alone[0].token_ids
    assert first.result().batch_size > 1
    for future, one in zip(later, alone[1:], strict=True):
        assert future.result().token_ids == one.token_ids


def wait_until(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.001)


class MemoryLimitedModel:
    """The real model on a device with little memory: a step whose rows attend over more than
    `max_cells` positions in all (what activation memory scales with) raises the out-of-memory
    error CUDA would."""

    def __init__(self, model, max_cells: int) -> None:
        self.model, self.max_cells = model, max_cells
        self.device, self.config, self.dtype = model.device, model.config, model.dtype
        self.refused: list[int] = []

    def __call__(self, **kwargs):
        cells = current_step().context_cells
        if cells > self.max_cells:
            self.refused.append(cells)
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return self.model(**kwargs)


def test_out_of_memory_splits_the_batch_and_every_job_still_matches_alone(loaded, engine):
    requests = requests_for(loaded)
    alone = [engine.generate(request).token_ids for request in requests]
    # Room for about two rows of the longest job: five rows together cannot fit.
    small = MemoryLimitedModel(loaded.model, max_cells=2 * max(r.token_budget for r in requests))
    limited = Engine(small, pad_id=loaded.pad_id,
                     limits=EngineLimits(max_batch_size=8, batch_wait_s=0.5)).start()
    try:
        jobs = [limited.submit(r) for r in requests]
        outputs = [job.future.result(timeout=120) for job in jobs]
    finally:
        limited.stop()
    assert small.refused, "the batch never hit the memory limit: the test proves nothing"
    assert [o.token_ids for o in outputs] == alone
    # The newest rows gave their place back and were recomputed later, unchanged.
    assert any(job.preemptions for job in jobs)


def test_a_job_too_big_even_alone_fails_clearly_and_the_rest_complete(loaded, engine):
    requests = requests_for(loaded)
    alone = [engine.generate(request).token_ids for request in requests]
    # Room for any one of these jobs alone, not for a prompt three times the longest.
    room = max(r.token_budget for r in requests)
    longest = max(requests, key=lambda r: len(r.prompt_ids))
    big = EngineRequest(list(longest.prompt_ids) * 3, 4, GREEDY, frozenset())
    assert len(big.prompt_ids) > room
    small = MemoryLimitedModel(loaded.model, max_cells=room)
    limited = Engine(small, pad_id=loaded.pad_id,
                     limits=EngineLimits(max_batch_size=8, batch_wait_s=0.5)).start()
    try:
        futures = [limited.submit(r).future for r in [big, *requests]]
        with pytest.raises(DeviceOutOfMemory, match=f"{len(big.prompt_ids)} prompt tokens"):
            futures[0].result(timeout=120)
        assert [f.result(timeout=120).token_ids for f in futures[1:]] == alone
        # And it keeps serving.
        assert limited.generate(requests[0]).token_ids == alone[0]
    finally:
        limited.stop()


# --- the v2 engine: chunked prefill, prefix caching, preemption (all against runs alone)

def engine_with(loaded, **limits):
    options = {"max_batch_size": 8, "batch_wait_s": 0.5, **limits}
    return Engine(loaded.model, pad_id=loaded.pad_id, limits=EngineLimits(**options)).start()


def run_all(engine, requests):
    jobs = [engine.submit(request) for request in requests]
    return jobs, [job.future.result(timeout=120) for job in jobs]


def test_chunked_prefill_equals_one_at_a_time(loaded, engine):
    requests = requests_for(loaded)
    alone = [engine.generate(request).token_ids for request in requests]
    # 7 tokens a step: every prompt is prefilled in chunks while the others decode.
    chunked = engine_with(loaded, max_step_tokens=7)
    try:
        _, outputs = run_all(chunked, requests)
    finally:
        chunked.stop()
    assert [o.token_ids for o in outputs] == alone
    assert max(o.batch_size for o in outputs) > 1


SYSTEM = ("You are a careful assistant for a batching engine. Answer briefly, state what you "
          "assume, and never invent numbers you were not given. " * 3)


def with_system(loaded, question, max_new=12):
    request = ChatRequest.model_validate({"messages": [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})
    return EngineRequest(build_prompt_ids(loaded, request), max_new, GREEDY, frozenset())


def test_prefix_cache_hits_reuse_the_system_prompt_and_change_nothing(loaded):
    first, second = with_system(loaded, "Hi"), with_system(loaded, "What is 2 + 2?")
    uncached = engine_with(loaded, prefix_caching=False)
    try:
        expected = [uncached.generate(r) for r in (first, second)]
    finally:
        uncached.stop()
    assert [o.cached_prompt_tokens for o in expected] == [0, 0]

    cached = engine_with(loaded, block_size=4)
    try:
        outputs = [cached.generate(r) for r in (first, second, second)]
    finally:
        cached.stop()
    assert outputs[0].cached_prompt_tokens == 0
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt_ids, second.prompt_ids,
                                                    strict=False)) if a != b)
    assert shared - 4 < outputs[1].cached_prompt_tokens <= shared  # whole blocks of it
    # The same prompt again: all of it but the last token, to the block.
    assert outputs[2].cached_prompt_tokens >= len(second.prompt_ids) - 4
    assert [o.token_ids for o in outputs] == [e.token_ids for e in (*expected, expected[1])]


def test_prefix_cache_hits_inside_a_batch_match_generate(loaded):
    requests = [with_system(loaded, q, max_new=10) for q in QUESTIONS]
    reference = [loaded.model.generate(
        torch.tensor([list(r.prompt_ids)]), max_new_tokens=r.max_new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=loaded.pad_id)[0, len(r.prompt_ids):].tolist()
        for r in requests[:2]]
    cached = engine_with(loaded, block_size=8, max_step_tokens=32)
    try:
        cached.generate(requests[0])  # the system prompt is now in the cache
        _, outputs = run_all(cached, requests)
    finally:
        cached.stop()
    assert all(o.cached_prompt_tokens > 0 for o in outputs)
    assert [o.token_ids for o in outputs[:2]] == reference


def test_a_full_pool_preempts_the_newest_row_and_outputs_do_not_change(loaded, engine):
    requests = requests_for(loaded, max_new=(40, 40, 40, 40, 40))
    alone = [engine.generate(request).token_ids for request in requests]
    # Blocks for about two of these jobs at once: the rest wait, or are preempted and redone.
    per_token = kv_bytes_per_token(loaded.model.config, loaded.model.dtype)
    room = 2 * max(r.token_budget for r in requests)
    small = engine_with(loaded, block_size=4, kv_cache_bytes=room * per_token)
    try:
        jobs, outputs = run_all(small, requests)
    finally:
        small.stop()
    assert [o.token_ids for o in outputs] == alone
    assert any(job.preemptions for job in jobs), "nothing was preempted: the test proves nothing"


def test_a_prompt_larger_than_the_pool_fails_alone(loaded):
    request = requests_for(loaded)[2]
    per_token = kv_bytes_per_token(loaded.model.config, loaded.model.dtype)
    tiny = engine_with(loaded, block_size=4, kv_cache_bytes=8 * per_token)
    try:
        with pytest.raises(DeviceOutOfMemory, match="prompt tokens"):
            tiny.generate(request)
        short = EngineRequest(request.prompt_ids[:3], 2, GREEDY, frozenset())
        assert len(tiny.generate(short).token_ids) == 2  # and it keeps serving
    finally:
        tiny.stop()


def test_seeded_sampling_is_reproducible_across_chunks_and_cache_hits(loaded):
    seeded = SamplingParams(do_sample=True, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    request = dataclasses.replace(with_system(loaded, "Hi", max_new=16), sampling=seeded)
    plain = engine_with(loaded, prefix_caching=False)
    try:
        alone = plain.generate(request).token_ids
    finally:
        plain.stop()
    busy = engine_with(loaded, max_step_tokens=9, block_size=4)
    try:
        busy.generate(request)  # now cached
        _, outputs = run_all(busy, [*requests_for(loaded), request])
    finally:
        busy.stop()
    assert outputs[-1].cached_prompt_tokens > 0
    assert outputs[-1].token_ids == alone


def test_the_engine_tells_its_relay_each_step_and_never_waits_for_its_redis(loaded, engine):
    from tests.unit.test_relay import FakeControl, text_of
    from worker.pipeline.reasoning import decode_part, split_reasoning
    from worker.relay import Relay

    control = FakeControl()
    control.release.clear()  # Redis hangs in the relay's first write, until the end
    relay = Relay(control, loaded.tokenizer, loaded.think).start()  # type: ignore[arg-type]
    steps: list[int] = []
    engine.on_step(lambda: steps.append(1))
    engine.on_step(relay.wake)
    try:
        jobs = [engine.submit(request) for request in requests_for(loaded)]
        followed = [relay.follow(f"job-{i}", job, prompt_opened_thinking=False)
                    for i, job in enumerate(jobs)]
        outputs = [job.future.result(timeout=120) for job in jobs]  # finished, Redis still hung
        assert control.executing.is_set() and not control.written
        # (a job's result can be in hand just before its last step's notice)
        assert len(steps) >= max(len(output.token_ids) for output in outputs) - 1
        control.release.set()
        for one in followed:
            assert one.written.wait(30)
        assert control.pipelines < len(steps)  # what the hang held back went out together
        for i, output in enumerate(outputs):
            events = control.stream(f"job-{i}")
            assert events[0].type == "start" and events[-1].type == "end"
            split = split_reasoning(output.token_ids, loaded.think)
            assert text_of(events, "thinking") == decode_part(loaded.tokenizer,
                                                              split.thinking_ids, loaded.think)
            assert text_of(events, "content") == decode_part(loaded.tokenizer,
                                                             split.content_ids, loaded.think)
    finally:
        control.release.set()
        relay.stop()


@pytest.mark.parametrize("budget", [0, 1, 2, 5])
def test_a_thinking_budget_of_n_reports_at_most_n_thinking_tokens(loaded, budget):
    from worker.pipeline.reasoning import count_thinking_tokens, split_reasoning

    engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=EngineLimits(),
                    think=loaded.think).start()
    try:
        prompt = build_prompt_ids(loaded, ChatRequest.model_validate(
            {"messages": [{"role": "user", "content": "Hi! Who are you?"}]}))
        free = engine.generate(EngineRequest(prompt, 64, GREEDY, loaded.stop_ids))
        job = engine.submit(EngineRequest(
            prompt, 64, GREEDY, loaded.stop_ids, thinking_budget=budget,
            close_thinking_ids=loaded.close_thinking_ids))
        capped = job.future.result()
    finally:
        engine.stop()
    assert count_thinking_tokens(free.token_ids, loaded.think) > budget  # the budget bites
    split = split_reasoning(capped.token_ids, loaded.think)
    assert split.thinking_tokens == job.thinking_tokens <= budget
    assert loaded.think.close_id in capped.token_ids and split.content_ids
