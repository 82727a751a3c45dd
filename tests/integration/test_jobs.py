"""A chat job end to end: producer -> real Redis -> real worker on the trained tiny model ->
result."""

from __future__ import annotations

import pytest

from chatqueue_dev.models import (
    TINY_CONTENT,
    TINY_MESSAGES,
    TINY_MODEL_ID,
    TINY_MULTI_CONTENT,
    TINY_MULTI_THINKING,
    TINY_MULTI_TURN,
    TINY_NO_THINK_CONTENT,
    TINY_THINKING,
)
from producer import ChatQueueClient, ChatRequest, JobFailed
from worker.manifest import read_manifest

pytestmark = pytest.mark.integration

GREEDY = {"do_sample": False}


def submit(client: ChatQueueClient, messages: list[dict[str, str]], **params: object) -> str:
    return client.submit(
        ChatRequest.model_validate({"messages": messages, "params": {**GREEDY, **params}})
    )


def test_thinking_and_content_are_what_the_model_says(tiny_client, tiny_model_dir):
    result = tiny_client.result(submit(tiny_client, TINY_MESSAGES))

    assert (result.thinking, result.content) == (TINY_THINKING, TINY_CONTENT)
    assert result.finish_reason == "stop"
    assert result.model_id == TINY_MODEL_ID
    assert result.model_revision == read_manifest(tiny_model_dir).commit
    assert result.device == "cpu"
    assert result.usage.thinking_tokens > 0
    assert result.usage.completion_tokens > result.usage.thinking_tokens
    assert result.timings.queue_wait_s is not None and result.timings.queue_wait_s >= 0
    assert result.timings.started_at <= result.timings.finished_at
    timings = result.timings
    assert timings.first_token_s is not None and timings.batch_wait_s is not None
    assert 0 <= timings.batch_wait_s <= timings.first_token_s <= timings.generation_s


def test_multi_turn_conversation(tiny_client):
    result = tiny_client.result(submit(tiny_client, TINY_MULTI_TURN))

    assert (result.thinking, result.content) == (TINY_MULTI_THINKING, TINY_MULTI_CONTENT)


def test_thinking_disabled_gives_content_only(tiny_client):
    result = tiny_client.result(submit(tiny_client, TINY_MESSAGES, enable_thinking=False))

    assert (result.thinking, result.content) == ("", TINY_NO_THINK_CONTENT)
    assert result.usage.thinking_tokens == 0


def test_cut_off_inside_thinking_is_all_thinking(tiny_client):
    result = tiny_client.result(submit(tiny_client, TINY_MESSAGES, max_new_tokens=4))

    assert result.finish_reason == "length"
    assert result.content == ""
    assert result.thinking and TINY_THINKING.startswith(result.thinking)
    assert result.usage.completion_tokens == 4


def test_client_chosen_job_id_is_kept(tiny_client):
    request = ChatRequest.model_validate(
        {"messages": TINY_MESSAGES, "params": GREEDY, "job_id": "client-42.a"}
    )
    assert tiny_client.submit(request) == "client-42.a"
    assert tiny_client.result("client-42.a").job_id == "client-42.a"


@pytest.mark.parametrize(
    ("raw", "field", "limit", "value"),
    [
        pytest.param(
            {"messages": TINY_MESSAGES, "params": {"max_new_tokens": 1000}},
            "params.max_new_tokens",
            256,
            "1000",
            id="over-worker-cap",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": ""}]},
            "messages.0.content",
            1,
            "''",
            id="empty-content",
        ),
        pytest.param(
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages.0.role",
            None,
            "'robot'",
            id="unknown-role",
        ),
        pytest.param(
            {"messages": TINY_MESSAGES, "temperature": 0.5},
            "temperature",
            None,
            "0.5",
            id="extra-field",
        ),
    ],
)
def test_bad_request_gets_structured_error_and_worker_keeps_serving(
    tiny_client, raw, field, limit, value
):
    # Sent as raw kwargs, past the producer's own validation, as a buggy or hostile client would.
    job = tiny_client.app.send_task(
        "chatqueue.generate_chat", kwargs={"request": raw}, queue=tiny_client.settings.queue
    )
    with pytest.raises(JobFailed) as failed:
        tiny_client.result(job.id)
    error = failed.value.error
    assert error.field == field
    assert error.limit == limit
    assert str(error.value) == value
    assert field in error.message and str(value) in error.message
    assert tiny_client.state(job.id) == "FAILURE"

    after = tiny_client.result(submit(tiny_client, TINY_MESSAGES))
    assert after.content == TINY_CONTENT
