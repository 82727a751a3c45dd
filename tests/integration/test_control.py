"""In-flight control against a real worker: streaming, progress, cancel, deadlines and the
thinking budget."""

from __future__ import annotations

import uuid

import pytest

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES, TINY_MULTI_TURN, TINY_THINKING
from producer import ChatQueueClient, ChatRequest, ProducerSettings
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration

LONG = 3000  # tokens: seconds of decoding for the tiny model, ample time to act on a running job


@pytest.fixture(scope="module")
def client(redis, start_worker, tiny_model_dir):
    queue = f"control-{uuid.uuid4().hex[:6]}"
    start_worker(tiny_model_dir, queue, concurrency="1", max_new_tokens_cap="4096",
                 default_max_new_tokens="64")
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue,
                                          wait_timeout_s=120)) as client:
        yield client


def submit(client: ChatQueueClient, messages=TINY_MESSAGES, **params) -> str:
    return client.submit(ChatRequest.model_validate(
        {"messages": messages, "params": {"do_sample": False, **params}}))


def running(client: ChatQueueClient, job_id: str) -> None:
    """Wait until the job's progress shows generated tokens."""
    wait_until(lambda: (p := client.progress(job_id)) is not None and p.tokens > 0,
               timeout=120, what=f"job {job_id} to be generating")


def test_streamed_text_concatenated_equals_the_result(client):
    job_id = submit(client)
    events = list(client.stream(job_id))
    result = client.result(job_id)

    assert events[0].type == "start" and events[-1].type == "end"
    assert events[-1].finish_reason == result.finish_reason == "stop"
    thinking = "".join(e.text for e in events if e.type == "thinking")
    content = "".join(e.text for e in events if e.type == "content")
    assert (thinking, content) == (result.thinking, result.content) == (TINY_THINKING, TINY_CONTENT)


def test_stream_read_after_the_job_ended_starts_from_the_beginning(client):
    job_id = submit(client, TINY_MULTI_TURN)
    result = client.result(job_id)

    content = "".join(e.text for e in client.stream(job_id, timeout=10) if e.type == "content")
    assert content == result.content


def test_cancel_running_job_and_queued_job(client):
    # One task slot: the first job runs, the second waits in the queue behind it.
    first = submit(client, max_new_tokens=LONG, ignore_eos=True)
    running(client, first)
    progress = client.progress(first)
    assert progress is not None and progress.phase in ("thinking", "answering")
    second = submit(client)

    client.cancel(second)
    client.cancel(first)

    stopped = client.result(first)
    assert stopped.finish_reason == "cancelled"
    assert 0 < stopped.usage.completion_tokens < LONG
    never_started = client.result(second)
    assert never_started.finish_reason == "cancelled"
    assert never_started.usage.completion_tokens == 0
    assert client.result(submit(client)).content == TINY_CONTENT  # still serving


def test_deadline_stops_a_job_with_its_partial_output(client):
    result = client.result(submit(client, max_new_tokens=LONG, ignore_eos=True, timeout_s=1.0))

    assert result.finish_reason == "timeout"
    assert 0 < result.usage.completion_tokens < LONG
    assert result.timings.generation_s < 30


def test_thinking_budget_closes_the_thinking_and_the_model_answers(client):
    free = client.result(submit(client))
    capped = client.result(submit(client, max_thinking_tokens=2))

    assert capped.usage.thinking_tokens <= 2 < free.usage.thinking_tokens
    assert len(capped.thinking) < len(TINY_THINKING)
    assert capped.content != ""


@pytest.fixture(scope="module")
def batch_client(redis, start_worker, tiny_model_dir):
    queue = f"batch-{uuid.uuid4().hex[:6]}"
    start_worker(tiny_model_dir, queue, concurrency="4", max_new_tokens_cap="4096")
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue,
                                          wait_timeout_s=180)) as client:
        yield client


def test_cancel_leaves_the_other_jobs_of_the_batch_unaffected(batch_client):
    budget = 800
    alone = batch_client.result(submit(batch_client, TINY_MULTI_TURN, max_new_tokens=budget,
                                       ignore_eos=True))
    victim = submit(batch_client, max_new_tokens=LONG, ignore_eos=True)
    running(batch_client, victim)
    survivor = submit(batch_client, TINY_MULTI_TURN, max_new_tokens=budget, ignore_eos=True)
    running(batch_client, survivor)  # joined the victim's running batch

    batch_client.cancel(victim)

    assert batch_client.result(victim).finish_reason == "cancelled"
    finished = batch_client.result(survivor)
    assert finished.finish_reason == "length"
    assert (finished.thinking, finished.content) == (alone.thinking, alone.content)
