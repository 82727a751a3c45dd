"""The job contract: good requests pass, bad ones fail with an error naming field, limit and
value."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.core import plan_submission
from producer.errors import JobFailed
from producer.schemas import (
    MAX_MESSAGES,
    MAX_NEW_TOKENS_CEILING,
    MAX_REQUEST_BYTES,
    ChatRequest,
    error_from_validation,
    request_size,
)
from producer.settings import ProducerSettings
from worker.settings import WorkerSettings

USER = {"role": "user", "content": "Hi"}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"messages": [USER]}, id="one-user-turn"),
        pytest.param({"messages": [{"role": "system", "content": "Be brief."}, USER]}, id="system"),
        pytest.param({"messages": [USER, {"role": "assistant", "content": "Hello"}, USER]},
                     id="multi-turn"),
        pytest.param({"messages": [USER], "params": {"max_new_tokens": 16, "do_sample": True,
                      "temperature": 0.6, "top_p": 0.95, "top_k": 20, "seed": 7,
                      "enable_thinking": False}}, id="all-params"),
        pytest.param({"messages": [USER], "job_id": "order-17:retry.2"}, id="client-job-id"),
    ],
)
def test_good_requests(raw):
    assert ChatRequest.model_validate(raw).messages[-1].role == "user"


@pytest.mark.parametrize(
    ("raw", "field", "limit"),
    [
        pytest.param({}, "messages", None, id="missing-messages"),
        pytest.param({"messages": []}, "messages", 1, id="no-messages"),
        pytest.param({"messages": [USER] * (MAX_MESSAGES + 1)}, "messages", MAX_MESSAGES,
                     id="too-many-messages"),
        pytest.param({"messages": [{"role": "user", "content": "   "}]}, "messages.0.content", None,
                     id="blank-content"),
        pytest.param({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", None,
                     id="unknown-role"),
        pytest.param({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", None,
                     id="content-not-a-string"),
        pytest.param({"messages": [USER, {"role": "assistant", "content": "Hello"}]}, None, None,
                     id="last-turn-not-user"),
        pytest.param({"messages": [USER], "params": {"max_new_tokens": 0}},
                     "params.max_new_tokens", 1, id="max-new-tokens-zero"),
        pytest.param({"messages": [USER], "params": {"max_new_tokens": MAX_NEW_TOKENS_CEILING + 1}},
                     "params.max_new_tokens", MAX_NEW_TOKENS_CEILING, id="max-new-tokens-ceiling"),
        pytest.param({"messages": [USER], "params": {"temperature": 0}}, "params.temperature", 0.0,
                     id="temperature-zero"),
        pytest.param({"messages": [USER], "params": {"top_p": 1.5}}, "params.top_p", 1.0,
                     id="top-p-over-one"),
        pytest.param({"messages": [USER], "params": {"seed": -1}}, "params.seed", 0,
                     id="negative-seed"),
        pytest.param({"messages": [USER], "stream": True}, "stream", None, id="extra-field"),
        pytest.param({"messages": [USER], "params": {"beams": 4}}, "params.beams", None,
                     id="extra-param"),
        pytest.param({"messages": [USER], "job_id": "../../etc"}, "job_id", None,
                     id="job-id-pattern"),
    ],
)
def test_bad_requests_name_field_limit_and_value(raw, field, limit):
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate(raw)
    error = error_from_validation(caught.value)

    assert error.code == "invalid_request"
    assert error.field == field
    if limit is not None:
        assert error.limit == limit
        assert f"{limit:g}" in error.message
    assert error.value is not None and error.value in error.message
    assert (field or "request") in error.message


def test_huge_value_is_shortened_in_the_error():
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate({"messages": [{"role": "user", "content": "x" * 300_000}]})
    error = error_from_validation(caught.value)
    assert error.field == "messages.0.content"
    assert len(error.message) < 400


# --------------------------------------------------------------------------- the byte ceiling


def _sized(total_bytes: int) -> dict[str, object]:
    """A request of about total_bytes as JSON, each message under MAX_MESSAGE_CHARS."""
    count = total_bytes // 100_000 + 1
    return {"messages": [{"role": "user", "content": "x" * 100_000}] * count}


@pytest.mark.parametrize(
    ("limit", "raw"),
    [
        pytest.param(MAX_REQUEST_BYTES, _sized(MAX_REQUEST_BYTES), id="contract-ceiling"),
        pytest.param(600_000, _sized(600_000), id="producer-setting"),
        pytest.param(MAX_REQUEST_BYTES, ChatRequest.model_validate(_sized(MAX_REQUEST_BYTES)),
                     id="a-built-ChatRequest"),
        # 256 messages of 200,000 characters passed every per-field ceiling: 51 MB.
        pytest.param(MAX_REQUEST_BYTES, {"messages": [{"role": "user", "content": "x" * 200_000}]
                                         * MAX_MESSAGES}, id="every-field-at-its-ceiling"),
    ],
)
def test_producer_refuses_a_request_over_the_byte_limit_before_publishing(limit, raw):
    settings = ProducerSettings(max_request_bytes=limit)
    with pytest.raises(JobFailed) as failed:
        plan_submission(raw, settings)
    error = failed.value.error
    assert (error.code, error.field, error.limit) == ("limit_exceeded", "request", limit)
    assert isinstance(error.value, int) and error.value > limit
    assert str(limit) in error.message and str(error.value) in error.message
    assert error.message.startswith("request: ")


def test_request_just_under_the_byte_limit_is_published_as_measured():
    job = plan_submission({"messages": [USER]}, ProducerSettings())
    size = request_size(job.kwargs["request"])
    assert plan_submission({"messages": [USER]}, ProducerSettings(max_request_bytes=size))
    with pytest.raises(JobFailed):
        plan_submission({"messages": [USER]}, ProducerSettings(max_request_bytes=size - 1))


def test_the_byte_limit_cannot_be_set_over_the_contract_ceiling():
    with pytest.raises(ValidationError):
        ProducerSettings(max_request_bytes=MAX_REQUEST_BYTES + 1)
    with pytest.raises(ValidationError):
        WorkerSettings(max_request_bytes=MAX_REQUEST_BYTES + 1)
