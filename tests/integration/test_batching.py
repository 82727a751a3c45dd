"""Jobs of very different lengths share one worker's batch and each ends as it would alone."""

from __future__ import annotations

import re
import uuid

import pytest

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES, TINY_MULTI_TURN, TINY_THINKING
from producer import ChatQueueClient, ChatRequest, ProducerSettings
from tests.support.logs import wait_logged

pytestmark = pytest.mark.integration

LONG_TEXT = " ".join(f"Item {i}: a line of a long report about the weekly sync." for i in range(40))
# (messages, params): a long prompt decoding long, a one-token job, a job ending on its own EOS,
# and a multi-turn one cut off after a few tokens. Greedy: each has exactly one right answer.
JOBS = [
    ([{"role": "user", "content": LONG_TEXT}], {"max_new_tokens": 250, "ignore_eos": True}),
    ([{"role": "user", "content": "Hi"}], {"max_new_tokens": 1, "ignore_eos": True}),
    (TINY_MESSAGES, {}),
    (TINY_MULTI_TURN, {"max_new_tokens": 6}),
]


def request(messages, params) -> ChatRequest:
    return ChatRequest.model_validate(
        {"messages": messages, "params": {"do_sample": False, **params}})


def batch_sizes(log: str, job_ids: list[str]) -> dict[str, int]:
    found = dict(re.findall(r"job (\w+) done: .* batch=(\d+)", log))
    return {job_id: int(found[job_id]) for job_id in job_ids}


def test_mixed_lengths_batched_equal_each_alone(redis, start_worker, tiny_model_dir):
    queue = f"mixed-{uuid.uuid4().hex[:6]}"
    worker = start_worker(tiny_model_dir, queue, max_new_tokens_cap="256",
                          default_max_new_tokens="64", concurrency="8")
    settings = ProducerSettings(broker_url=redis.url, queue=queue, wait_timeout_s=120)
    with ChatQueueClient(settings) as client:
        alone = [client.result(client.submit(request(*job))) for job in JOBS]

        # The long job first; once its stream starts the engine has it (it decodes for seconds),
        # and the others must join it.
        long_id = client.submit(request(*JOBS[0]))
        next(event for event in client.stream(long_id) if event.type == "start")
        others = [client.submit(request(*job)) for job in JOBS[1:]]
        together = [client.result(job_id) for job_id in [long_id, *others]]

    assert (alone[2].thinking, alone[2].content) == (TINY_THINKING, TINY_CONTENT)
    assert alone[3].finish_reason == "length" and alone[3].thinking  # cut off mid-thought
    assert [alone[0].usage.completion_tokens, alone[1].usage.completion_tokens] == [250, 1]
    for one, batched in zip(alone, together, strict=True):
        # The second time, the prompts' blocks come from the prefix cache: only that differs.
        uncached = batched.usage.model_copy(update={"cached_prompt_tokens": 0})
        assert (batched.thinking, batched.content, batched.finish_reason, uncached) == (
            one.thinking, one.content, one.finish_reason, one.usage)
    assert together[0].usage.cached_prompt_tokens > 0
    # They did share the device: the long job decoded alongside at least one other.
    # Each "done" line is written before its result is stored, but reaches the log through a
    # pipe: wait for the last ones.
    log = wait_logged(worker, *(f"job {r.job_id} done:" for r in together))
    sizes = batch_sizes(log, [r.job_id for r in together])
    assert sizes[long_id] >= 2, sizes
    assert all(r.timings.batch_wait_s is not None for r in together)
