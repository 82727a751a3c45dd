"""What makes two publishes of one job id the same request (producer.client.request_digest)."""

from __future__ import annotations

import pytest

from producer import ChatRequest
from producer.client import request_digest

REQUEST = {"messages": [{"role": "user", "content": "Hello"}], "job_id": "order-17"}


def body(request: dict[str, object], **extra: object) -> dict[str, object]:
    dumped = ChatRequest.model_validate(request).model_dump(mode="json")
    return {"request": dumped, **extra}


def test_the_same_request_has_one_digest_whenever_and_however_it_is_written():
    first = request_digest(None, body(REQUEST, submitted_at=1.0))
    assert request_digest((), body(REQUEST, submitted_at=2.0)) == first  # when: not the request
    reordered = {"job_id": "order-17", "messages": [{"content": "Hello", "role": "user"}]}
    assert request_digest(None, body(reordered)) == first
    # Defaults written out are the request the contract reads: the same one.
    explicit = {**REQUEST, "params": ChatRequest.model_validate(REQUEST).params.model_dump()}
    assert request_digest(None, body(explicit)) == first


@pytest.mark.parametrize(
    "other",
    [
        pytest.param({**REQUEST, "params": {"max_new_tokens": 5}}, id="params"),
        pytest.param({**REQUEST, "messages": [{"role": "user", "content": "Hello!"}]},
                     id="messages"),
        pytest.param({**REQUEST, "model": "org/other"}, id="model"),
    ],
)
def test_a_different_request_has_another_digest(other):
    assert request_digest(None, body(other)) != request_digest(None, body(REQUEST))


def test_raw_arguments_that_are_not_json_still_get_a_digest():
    assert request_digest(("positional",), {"request": {1, 2}}) != request_digest(None, {})
    assert request_digest(None, {"request": "\ud800"})  # a lone surrogate
