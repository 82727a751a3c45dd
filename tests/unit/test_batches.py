"""Batch files: parsing, mapping a chat.completions body onto the contract, output lines and
the batch object's lifecycle -- the pure layer of producer/batches.py."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from openai.types.chat import ChatCompletion

from producer.batches import (
    LineError,
    LinePolicy,
    batch_object,
    batch_of_job,
    batch_status,
    error_line,
    line_from_meta,
    line_job_id,
    map_body,
    named_lines,
    parse_line,
    parse_window,
    plan_chunk,
    read_line,
)
from producer.schemas import BATCH_PRIORITY, JOB_ID_PATTERN, JobError, request_size

USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param({"messages": USER}, {"params": {}, "priority": BATCH_PRIORITY},
                     id="minimal"),
        pytest.param({"messages": USER, "max_completion_tokens": 7, "max_tokens": 9},
                     {"params": {"max_new_tokens": 7}}, id="max_completion_tokens-wins"),
        pytest.param({"messages": USER, "max_tokens": 9}, {"params": {"max_new_tokens": 9}},
                     id="max_tokens"),
        pytest.param({"messages": USER, "temperature": 0}, {"params": {"do_sample": False}},
                     id="temperature-0-is-greedy"),
        pytest.param({"messages": USER, "temperature": 0.7, "top_p": 0.9, "seed": 3},
                     {"params": {"temperature": 0.7, "top_p": 0.9, "seed": 3}}, id="sampling"),
        pytest.param({"messages": USER, "stop": "END"}, {"params": {"stop": ["END"]}},
                     id="stop-string"),
        pytest.param({"messages": USER, "stop": ["a", "b"]}, {"params": {"stop": ["a", "b"]}},
                     id="stop-list"),
        pytest.param({"messages": USER, "chat_template_kwargs": {"enable_thinking": False},
                      "thinking_token_budget": 5},
                     {"params": {"enable_thinking": False, "max_thinking_tokens": 5}},
                     id="thinking"),
        pytest.param({"messages": USER, "priority": 8}, {"priority": 8}, id="priority"),
        pytest.param({"messages": [{"role": "developer", "content": "Be brief."},
                                   {"role": "user", "content": [
                                       {"type": "text", "text": "one"},
                                       {"type": "text", "text": "two"}]}]},
                     {"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "one\ntwo"}]}, id="text-parts"),
        pytest.param({"messages": USER, "n": 1, "stream": False, "logprobs": False,
                      "presence_penalty": 0, "user": "u1", "tools": None},
                     {"params": {}}, id="neutral-values-accepted"),
        pytest.param({"messages": USER, "model": "org/model"}, {"model": "org/model"},
                     id="model"),
    ],
)
def test_body_maps_onto_the_contract(body, expected):
    request = map_body(body).model_dump(exclude_defaults=False)
    for key, value in expected.items():
        if key == "params":
            params = {k: v for k, v in request["params"].items() if v is not None}
            defaults = {"enable_thinking": True, "ignore_eos": False}
            assert {k: v for k, v in params.items()
                    if k not in defaults or defaults[k] != v} == value
        elif key == "messages":
            assert [{"role": m["role"], "content": m["content"]}
                    for m in request["messages"]] == value
        else:
            assert request[key] == value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"messages": USER, "n": 2}, "n", id="n"),
        pytest.param({"messages": USER, "n": True}, "n", id="n-bool"),
        pytest.param({"messages": USER, "tools": [{"type": "function"}]}, "tools", id="tools"),
        pytest.param({"messages": USER, "logprobs": True}, "logprobs", id="logprobs"),
        pytest.param({"messages": USER, "response_format": {"type": "json_object"}},
                     "response_format", id="response_format"),
        pytest.param({"messages": USER, "stream": True}, "stream", id="stream"),
        pytest.param({"messages": USER, "frequency_penalty": 0.5}, "frequency_penalty",
                     id="penalty"),
        pytest.param({"messages": USER, "chat_template_kwargs": {"tools": 1}},
                     "chat_template_kwargs.tools", id="template-kwarg"),
        pytest.param({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type", id="image-part"),
        pytest.param({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
                     id="tool-role"),
        pytest.param({"messages": USER, "temperature": 11.0}, "temperature",
                     id="contract-limit"),
        pytest.param({"messages": USER, "max_tokens": "9"}, "max_tokens", id="contract-type"),
        pytest.param({"messages": USER, "stop": ["a"] * 5}, "stop", id="too-many-stops"),
        pytest.param({"messages": "hi"}, "messages", id="messages-not-list"),
    ],
)
def test_unsupported_or_invalid_fields_fail_the_line_naming_them(body, param):
    with pytest.raises(LineError) as caught:
        map_body(body)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    assert param.split("[")[0].split(".")[0] in caught.value.message


@pytest.mark.parametrize(
    ("text", "param"),
    [
        pytest.param("{not json", None, id="not-json"),
        pytest.param("[1]", None, id="not-object"),
        pytest.param('{"body": {}}', "custom_id", id="no-custom-id"),
        pytest.param('{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "url",
                     id="other-endpoint"),
        pytest.param('{"custom_id": "a", "method": "GET", "body": {}}', "method", id="method"),
        pytest.param('{"custom_id": "a", "body": {}, "extra": 1}', "extra", id="unknown-key"),
        pytest.param('{"custom_id": "a", "body": []}', "body", id="body-not-object"),
    ],
)
def test_bad_lines_are_refused(text, param):
    with pytest.raises(LineError) as caught:
        parse_line(text, 0)
    assert caught.value.param == param


def test_a_good_line_parses():
    line = parse_line(json.dumps({"custom_id": "r1", "method": "POST",
                                  "url": "/v1/chat/completions", "body": {"messages": USER}}), 3)
    assert (line.index, line.custom_id, line.body["messages"]) == (3, "r1", USER)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [pytest.param("24h", 86_400, id="hours"), pytest.param("90m", 5400, id="minutes"),
     pytest.param("2d", 172_800, id="days"), pytest.param("1.5s", 1.5, id="seconds"),
     pytest.param("30", 30, id="bare")],
)
def test_windows(text, seconds):
    assert parse_window(text) == seconds


@pytest.mark.parametrize("text", ["", "0h", "-1h", "1w", "h"])
def test_bad_windows(text):
    with pytest.raises(ValueError, match="completion window"):
        parse_window(text)


def test_line_job_ids_are_valid_stable_and_name_their_batch():
    job_id = line_job_id("batch_abc", "any custom id: ünïcode / slashes")
    assert job_id == line_job_id("batch_abc", "any custom id: ünïcode / slashes")
    assert job_id != line_job_id("batch_abc", "another")
    import re
    assert re.fullmatch(JOB_ID_PATTERN, job_id)
    assert batch_of_job(job_id) == "batch_abc"
    assert batch_of_job("0a1b2c") is None


def result_dict(**overrides):
    now = datetime.now(tz=UTC).isoformat()
    result = {
        "job_id": "j", "model_id": "org/m", "model_revision": "r", "thinking": "hmm",
        "content": "Hello", "finish_reason": "stop",
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "thinking_tokens": 2},
        "timings": {"queued_at": None, "started_at": now, "finished_at": now,
                    "queue_wait_s": None, "generation_s": 0.1, "tokens_per_s": 40.0},
        "worker_host": "h", "device": "cpu",
    }
    return {**result, **overrides}


def test_output_lines_are_chat_completions_the_openai_types_read():
    kind, line = line_from_meta("c1", "batch_x.1", {"status": "SUCCESS",
                                                    "result": result_dict()},
                                status="in_progress")
    assert kind == "output" and line["custom_id"] == "c1" and line["error"] is None
    completion = ChatCompletion.model_validate(line["response"]["body"])
    assert completion.choices[0].message.content == "Hello"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.completion_tokens_details.reasoning_tokens == 2
    message = line["response"]["body"]["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "hmm"


@pytest.mark.parametrize(
    ("meta", "status", "code", "status_code"),
    [
        pytest.param({"status": "FAILURE", "result": {"exc_type": "JobFailed", "exc_message": [
            {"code": "limit_exceeded", "field": "params.max_new_tokens", "message": "too many"}
        ]}}, "in_progress", "limit_exceeded", 400, id="worker-refused"),
        pytest.param({"status": "FAILURE", "result": {"exc_type": "RuntimeError"}},
                     "in_progress", "internal_error", 500, id="crash"),
        pytest.param(None, "expired", "batch_expired", None, id="expired"),
        pytest.param(None, "cancelled", "batch_cancelled", None, id="cancelled"),
        pytest.param({"status": "SUCCESS", "result": result_dict(finish_reason="cancelled")},
                     "cancelling", "batch_cancelled", None, id="cut-by-cancel"),
    ],
)
def test_error_lines(meta, status, code, status_code):
    kind, line = line_from_meta("c1", "batch_x.1", meta, status=status)
    assert kind == "error" and line["custom_id"] == "c1"
    if status_code is None:
        assert line["response"] is None and line["error"]["code"] == code
    else:
        assert line["response"]["status_code"] == status_code
        assert line["response"]["body"]["error"]["code"] == code


def test_unfinished_lines_of_a_running_batch_are_left_out():
    assert line_from_meta("c1", "batch_x.1", None, status="in_progress") is None
    assert line_from_meta("c1", "batch_x.1", {"status": "STARTED"}, status="cancelling") is None


def test_refused_line_error_names_the_param():
    line = error_line("c1", None, LineError("n: not supported", param="n"))
    assert line["response"]["body"]["error"]["param"] == "n"
    assert error_line("c1", None, JobError(code="batch_expired", message="x"))["error"]


@pytest.mark.parametrize(
    ("record", "status"),
    [
        pytest.param({}, "validating", id="validating"),
        pytest.param({"in_progress_at": "1"}, "in_progress", id="in-progress-unknown-total"),
        pytest.param({"in_progress_at": "1", "total": "3", "completed": "2"}, "in_progress",
                     id="in-progress"),
        pytest.param({"total": "3", "completed": "2", "failed": "1"}, "completed",
                     id="completed"),
        pytest.param({"in_progress_at": "1", "expires_at": "50"}, "expired", id="expired"),
        pytest.param({"total": "3", "completed": "3", "expires_at": "50"}, "completed",
                     id="completed-before-expiry"),
        pytest.param({"total": "3", "completed": "1", "cancelling_at": "5"}, "cancelling",
                     id="cancelling"),
        pytest.param({"total": "3", "completed": "1", "failed": "2", "cancelling_at": "5"},
                     "cancelled", id="cancelled"),
        pytest.param({"failed_at": "5"}, "failed", id="failed"),
    ],
)
def test_lifecycle(record, status):
    assert batch_status({"id": "batch_x", **record}, now=100.0) == status


def test_batch_object_has_openais_fields():
    batch = batch_object({"id": "batch_x", "created_at": "10", "expires_at": "1000",
                          "in_progress_at": "11", "total": "2", "completed": "1", "failed": "1",
                          "finished_at": "20", "metadata": '{"k": "v"}',
                          "completion_window": "24h"}, now=30.0)
    assert batch["status"] == "completed" and batch["completed_at"] == 20
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert batch["metadata"] == {"k": "v"} and batch["object"] == "batch"


class _Control:
    """What the worker's batch check reads of Redis: whether the batch's cancel key is set."""

    def __init__(self, cancelled: bool) -> None:
        self.cancelled = cancelled
        self.redis = self

    def exists(self, *keys: str) -> int:
        return int(self.cancelled)


@pytest.mark.parametrize(
    ("expires_in", "cancelled", "code"),
    [
        pytest.param(60.0, False, None, id="runs"),
        pytest.param(-1.0, False, "batch_expired", id="past-its-window"),
        pytest.param(60.0, True, "batch_cancelled", id="batch-cancelled"),
    ],
)
def test_the_worker_ends_an_unstarted_line_of_an_expired_or_cancelled_batch(
        expires_in, cancelled, code):
    import time

    from producer.errors import JobFailed
    from producer.schemas import BatchLine
    from worker.service import _check_batch_line

    line = BatchLine(batch_id="batch_x", custom_id="c", expires_at=time.time() + expires_in)
    if code is None:
        _check_batch_line(_Control(cancelled), line)
        return
    with pytest.raises(JobFailed) as caught:
        _check_batch_line(_Control(cancelled), line)
    assert caught.value.error.code == code


# --- the byte limit, and the pure planning a driver (sync or asyncio) shares


def _raw(custom_id: str, content: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id,
                       "body": {"messages": [{"role": "user", "content": content}], **body}})


POLICY = LinePolicy(batch_id="batch_t", window_s=3600.0, expires_at=2e9, priority=2,
                    stream=False, max_bytes=2_000)


def _plan(*texts: str, unique: list[bool] | None = None):
    chunk = [(i, read_line(text, i, POLICY.max_bytes)) for i, text in enumerate(texts)]
    named = named_lines(chunk)
    return plan_chunk(POLICY, chunk, unique if unique is not None else [True] * len(named),
                      lambda request: "q", now=5.0)


def test_a_line_over_the_byte_limit_is_its_error_line_naming_field_limit_and_size():
    text = _raw("big", "x" * 3_000)
    refused = read_line(text, 0, 2_000)
    assert isinstance(refused, LineError)
    size = request_size(json.loads(text)["body"])
    assert (refused.custom_id, refused.param, refused.code) == ("big", "body", "limit_exceeded")
    assert (refused.limit, refused.value) == (2_000, size)
    plan = _plan(_raw("ok", "hi"), text)
    assert [job.job_id for job in plan.jobs] == [line_job_id("batch_t", "ok")]  # never published
    (index, line), = plan.errors
    assert index == 1 and line["custom_id"] == "big"
    error = line["response"]["body"]["error"]
    assert line["response"]["status_code"] == 400
    assert (error["param"], error["code"]) == ("body", "limit_exceeded")
    assert f"{size} bytes" in error["message"] and "2000" in error["message"]


def test_a_body_under_the_limit_whose_request_as_published_is_over_it_is_refused_too():
    """The published request carries the contract's defaults: the worker measures that."""
    def published(n: int) -> int:
        return request_size(map_body(json.loads(_raw("c", "y" * n))["body"],
                                     job_id=line_job_id("batch_t", "c")).model_dump(mode="json"))

    n = next(n for n in range(1_000, 2_000) if published(n) > POLICY.max_bytes)
    text = _raw("c", "y" * n)
    assert request_size(json.loads(text)["body"]) <= POLICY.max_bytes
    plan = _plan(text)
    assert not plan.jobs
    (_, line), = plan.errors
    assert line["response"]["request_id"] == line_job_id("batch_t", "c")
    assert line["response"]["body"]["error"]["code"] == "limit_exceeded"
    assert len(_plan(_raw("c", "y" * (n - 1))).jobs) == 1  # one byte less is published


def test_a_chunk_plans_every_line_once_in_order():
    plan = _plan(_raw("a", "hi", max_tokens=3), "{bad", _raw("b", "hi", n=2), _raw("a", "again"),
                 unique=[True, True, False])
    assert plan.custom_ids == [(0, "a"), (1, None), (2, "b"), (3, "a")]
    assert [index for index, _ in plan.errors] == [1, 2, 3]
    (job,) = plan.jobs
    assert job.queue == "q" and job.kwargs["submitted_at"] == 5.0
    assert job.kwargs["request"]["priority"] == POLICY.priority
    assert job.kwargs["request"]["params"]["max_new_tokens"] == 3
    assert job.kwargs["batch"]["custom_id"] == "a" and job.kwargs["batch"]["stream"] is False


def test_batch_progress_metrics():
    from producer.batches.metrics import batch_families

    records = [
        {"id": "batch_run", "in_progress_at": "1", "seen": "7", "completed": "3", "failed": "1"},
        {"id": "batch_done", "total": "2", "completed": "2", "finished_at": "3"},
    ]
    batches, requests = batch_families(records, now=10.0)
    by_status = {s.labels["status"]: s.value for s in batches.samples}
    assert by_status["in_progress"] == 1 and by_status["completed"] == 1
    assert by_status["cancelled"] == 0  # every status exists from the first scrape
    assert {(s.labels["batch"], s.labels["state"]): s.value for s in requests.samples} == {
        ("batch_run", "total"): 7, ("batch_run", "completed"): 3, ("batch_run", "failed"): 1}


def test_no_module_of_the_batches_package_is_large():
    from pathlib import Path

    import producer.batches as package

    for path in Path(package.__file__).parent.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 350, path.name


def test_a_line_error_is_a_chatqueue_error_with_its_job_error():
    from producer.errors import ChatQueueError

    refused = read_line(_raw("big", "x" * 3_000), 0, 2_000)
    assert isinstance(refused, ChatQueueError) and refused.outcome == "failed"
    error = refused.job_error()
    assert (error.code, error.field, error.limit) == ("limit_exceeded", "body", 2_000)
    assert error.value == refused.value and error.message == refused.message
    assert LineError("n: not supported", param="n").job_error().code == "invalid_request"
