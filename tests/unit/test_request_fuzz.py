"""Property-based fuzz of the request contract, on both sides of the queue.

Whatever a client sends, reading it gives a ChatRequest or a structured JobError that names the
field, stays short and stores as JSON -- never another exception, which a worker would turn
into an internal error.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from producer import ChatRequest, JobFailed, parse_request
from producer.schemas import MAX_MESSAGE_CHARS
from worker.service import parse_request as worker_parse_request
from worker.service import request_size, task_arguments

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text as JSON can carry it: any character, lone surrogates included.
any_text = st.text(st.characters() | st.characters(categories=["Cs"]), max_size=30)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)
roles = st.sampled_from(["system", "user", "assistant"])
contents = st.text(min_size=1, max_size=40).filter(lambda text: text.strip() != "")


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    history = draw(st.lists(st.fixed_dictionaries({"role": roles, "content": contents}),
                            max_size=4))
    params = draw(st.fixed_dictionaries({}, optional={
        "max_new_tokens": st.integers(1, 4096),
        "do_sample": st.booleans(),
        "temperature": st.floats(0.01, 10.0),
        "top_p": st.floats(0.01, 1.0),
        "top_k": st.integers(0, 100),
        "seed": st.integers(0, 2**63 - 1),
        "enable_thinking": st.booleans(),
        "timeout_s": st.floats(0.1, 3600),
        "max_thinking_tokens": st.integers(0, 4096),
    }))
    return {"messages": [*history, {"role": "user", "content": draw(contents)}],
            "params": params}


def assert_structured(failed: JobFailed, codes: tuple[str, ...] = ("invalid_request",)) -> None:
    error = failed.error
    assert error.code in codes
    assert len(error.message) < 1000
    assert error.field is None or (len(error.field) < 200 and error.field in error.message)
    # Stores and logs as it is: valid UTF-8 all through (a lone surrogate in the input is
    # escaped, not passed on).
    error.model_dump_json().encode("utf-8")
    json.dumps(error.model_dump(), ensure_ascii=False).encode("utf-8")


@FUZZ
@given(json_values)
def test_any_json_value_is_a_request_or_a_structured_error(raw):
    try:
        request = parse_request(raw)
    except JobFailed as failed:
        assert_structured(failed)
    else:
        assert isinstance(request, ChatRequest)


@FUZZ
@given(valid_requests())
def test_valid_requests_read_back_the_same_after_a_trip_through_json(raw):
    request = parse_request(raw)
    wire = json.loads(json.dumps(request.model_dump(mode="json")))
    assert parse_request(wire) == request


def read_back(request: ChatRequest) -> ChatRequest:
    """The request after a trip through JSON, as the worker reads what the producer sent."""
    return parse_request(json.loads(json.dumps(request.model_dump(mode="json"))))


def value_at(tree: Any, path: tuple[str | int, ...]) -> Any:
    for part in path:
        tree = tree[part]
    return tree


@FUZZ
@given(valid_requests(), st.data())
def test_one_bad_field_is_the_one_named(raw, data):
    paths = [("messages", i, key) for i in range(len(raw["messages"]))
             for key in ("role", "content")] + [("params", key) for key in raw["params"]]
    path = data.draw(st.sampled_from(paths))
    value = data.draw(json_values | roles | contents, label="value")
    value_at(raw, path[:-1])[path[-1]] = value
    try:
        request = parse_request(raw)
    except JobFailed as failed:
        assert_structured(failed)
        named = ".".join(str(part) for part in path)
        if failed.error.field is None:
            # Only the whole-request rule has no field: a valid role on the last turn that is
            # not the user's.
            assert path == ("messages", len(raw["messages"]) - 1, "role")
            assert value in ("system", "assistant")
            assert "last message must come from the user" in failed.error.message
        else:
            assert failed.error.field == named
    else:
        event("a valid value")
        # The value was one the field takes: it is kept as given, and the request reads back
        # the same after a trip through JSON.
        assert value_at(request.model_dump(), path) == value
        assert type(value_at(request.model_dump(), path)) is (
            float if isinstance(value, int) and path[-1] in ("temperature", "top_p", "timeout_s")
            else type(value))
        assert request.messages[-1].role == "user"
        assert read_back(request) == request


@FUZZ
@given(json_values | valid_requests(), st.integers(1, 2_000))
def test_worker_reads_any_value_within_its_byte_limit(raw, max_bytes):
    """Over its byte limit the worker refuses a value before reading it; within it, the worker
    reads exactly what the producer reads: the same request, or the same error."""
    size = request_size(raw)
    try:
        request = worker_parse_request(raw, max_bytes=max_bytes)
    except JobFailed as failed:
        assert_structured(failed, ("invalid_request", "limit_exceeded"))
        if size > max_bytes:
            assert failed.error.code == "limit_exceeded"
            assert (failed.error.field, failed.error.limit, failed.error.value) == (
                "request", max_bytes, size)
        else:
            assert failed.error.code == "invalid_request"
            with pytest.raises(JobFailed) as producer_side:
                parse_request(raw)
            assert failed.error == producer_side.value.error
    else:
        event("read")
        assert size <= max_bytes
        assert request == parse_request(raw)
        assert read_back(request) == request


@FUZZ
@given(valid_requests(), st.integers(0, 64))
def test_worker_reads_a_valid_request_up_to_its_byte_limit_and_refuses_it_past(raw, slack):
    size = request_size(raw)
    request = worker_parse_request(raw, max_bytes=size + slack)
    assert request == parse_request(raw)
    assert request.messages[-1].content == raw["messages"][-1]["content"]
    assert request.params.model_dump(exclude_unset=True) == raw["params"]
    assert worker_parse_request(raw) == request  # no limit: read the same

    over = max(size - 1 - slack, 1)
    with pytest.raises(JobFailed) as refused:
        worker_parse_request(raw, max_bytes=over)
    assert (refused.value.error.code, refused.value.error.field, refused.value.error.limit,
            refused.value.error.value) == ("limit_exceeded", "request", over, size)


@FUZZ
@given(st.lists(json_values, max_size=3).map(tuple),
       st.dictionaries(st.sampled_from(["request", "submitted_at", "x"]) | any_text,
                       json_values, max_size=3))
def test_any_task_arguments_are_read_or_refused_with_a_structured_error(args, kwargs):
    try:
        arguments = task_arguments(args, kwargs)
    except JobFailed as failed:
        assert_structured(failed)
    else:
        assert not args and "request" in kwargs
        assert arguments.submitted_at is None or 0 <= arguments.submitted_at <= 1e11


def test_request_size_counts_utf8_bytes():
    assert request_size({"a": "é"}) == len('{"a":"é"}'.encode())
    assert request_size("\ud800") == 5  # quotes + the 3 bytes it would take
    assert request_size({"messages": ["x" * MAX_MESSAGE_CHARS]}) > MAX_MESSAGE_CHARS
