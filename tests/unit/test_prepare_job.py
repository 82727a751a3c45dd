"""prepare_job without Celery or Redis: a request becomes the engine's request with the tiny
model's real tokenizer and chat template, or a structured error naming the limit it breaks.
Every limit is checked on both sides of its boundary."""

from __future__ import annotations

import dataclasses
import time
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from chatqueue_dev.models import TINY_MESSAGES, TINY_MODEL_ID
from producer.errors import JobFailed
from producer.schemas import ChatRequest
from tests.support.templates import OpeningTemplate
from worker.manifest import read_manifest
from worker.model import load_model
from worker.pipeline.sampling import SamplingParams
from worker.service import prepare_job
from worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, read_manifest(tiny_model_dir),
                      device=torch.device("cpu"), dtype="float32")


def runtime(loaded: Any, **settings: Any) -> SimpleNamespace:
    """What prepare_job reads of a worker runtime: its settings and its loaded model."""
    return SimpleNamespace(settings=WorkerSettings(_env_file=None, **settings), loaded=loaded)


def request(messages: list[dict[str, str]] = TINY_MESSAGES, **fields: Any) -> ChatRequest:
    params = fields.pop("params", {})
    return ChatRequest.model_validate({"messages": messages, "params": params, **fields})


def template_ids(loaded: Any, messages: list[dict[str, str]], *,
                 enable_thinking: bool) -> list[int]:
    """The prompt as the tokenizer's own chat template writes and tokenizes it."""
    rendered = loaded.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking)
    return loaded.tokenizer(rendered, add_special_tokens=False)["input_ids"]


def refused(runtime_: Any, request_: ChatRequest) -> Any:
    with pytest.raises(JobFailed) as failed:
        prepare_job(runtime_, request_)
    error = failed.value.error
    assert error.field is not None and error.field in error.message
    return error


# ---------------------------------------------------------------- what the engine gets


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_the_prompt_is_the_chat_templates_with_no_extra_special_tokens(loaded, thinking):
    prepared = prepare_job(runtime(loaded),
                           request(params={"enable_thinking": thinking}))
    prompt = list(prepared.engine_request.prompt_ids)

    assert prompt == template_ids(loaded, TINY_MESSAGES, enable_thinking=thinking)
    text = loaded.tokenizer.decode(prompt)
    assert text.count("<|im_start|>") == len(TINY_MESSAGES) + 1  # no BOS or doubled tokens
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" if not thinking
                         else "<|im_start|>assistant\n")
    # Qwen3's template never leaves a think block open for the model: the model opens its own.
    assert prepared.prompt_opened_thinking is False
    assert prepared.engine_request.prompt_opened_thinking is False


def test_earlier_assistant_turns_go_in_without_their_thinking(loaded):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nsecret reasoning\n</think>\n\nHello!"},
        {"role": "user", "content": "Again"},
    ]
    text = loaded.tokenizer.decode(prepare_job(runtime(loaded),
                                               request(messages)).engine_request.prompt_ids)
    assert "secret reasoning" not in text
    assert "Hello!" in text and text.rstrip().endswith("<|im_start|>assistant")


def test_unset_sampling_takes_the_model_folders_generation_config(loaded):
    defaults = loaded.generation_defaults
    assert defaults.do_sample is True  # the tiny model's folder sets them (else this proves less)
    sampling = prepare_job(runtime(loaded), request()).engine_request.sampling

    assert sampling == SamplingParams(do_sample=True, temperature=defaults.temperature,
                                      top_p=defaults.top_p, top_k=defaults.top_k, seed=None)


def test_the_jobs_own_sampling_values_win(loaded):
    params = {"do_sample": False, "temperature": 1.3, "top_p": 0.5, "top_k": 3, "seed": 42}
    sampling = prepare_job(runtime(loaded), request(params=params)).engine_request.sampling
    assert sampling == SamplingParams(**params)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        pytest.param({}, 64, id="unset-takes-the-workers-default"),
        pytest.param({"max_new_tokens": 1}, 1, id="one"),
        pytest.param({"max_new_tokens": 100}, 100, id="exactly-the-cap"),
    ],
)
def test_max_new_tokens(loaded, params, expected):
    prepared = prepare_job(runtime(loaded, default_max_new_tokens=64, max_new_tokens_cap=100),
                           request(params=params))
    assert prepared.engine_request.max_new_tokens == expected


@pytest.mark.parametrize("ignore_eos", [False, True])
def test_stop_ids_are_the_models_unless_the_job_ignores_eos(loaded, ignore_eos):
    assert loaded.stop_ids  # the tiny model has end tokens: an empty set means ignore_eos
    stop_ids = prepare_job(runtime(loaded), request(params={"ignore_eos": ignore_eos})
                           ).engine_request.stop_ids
    assert stop_ids == (frozenset() if ignore_eos else loaded.stop_ids)


@pytest.mark.parametrize(
    ("timeout_s", "max_job_seconds", "allowed"),
    [
        pytest.param(None, 600.0, 600.0, id="unset-takes-the-workers-limit"),
        pytest.param(5.0, 600.0, 5.0, id="shorter-than-the-limit"),
        pytest.param(5000.0, 600.0, 600.0, id="capped-by-the-limit"),
    ],
)
def test_the_deadline_is_the_jobs_timeout_capped_by_the_workers(loaded, timeout_s,
                                                                 max_job_seconds, allowed):
    params = {} if timeout_s is None else {"timeout_s": timeout_s}
    before = time.monotonic()
    prepared = prepare_job(runtime(loaded, max_job_seconds=max_job_seconds),
                           request(params=params))
    after = time.monotonic()
    assert before + allowed <= prepared.engine_request.deadline <= after + allowed


@pytest.mark.parametrize("budget", [None, 0, 7])
def test_the_thinking_budget_and_how_the_template_closes_a_think_block(loaded, budget):
    params = {} if budget is None else {"max_thinking_tokens": budget}
    engine_request = prepare_job(runtime(loaded), request(params=params)).engine_request

    assert engine_request.thinking_budget == budget
    close = engine_request.close_thinking_ids
    assert loaded.think.close_id in close
    assert loaded.tokenizer.decode(list(close)) == "\n</think>\n\n"


def test_stop_strings_give_the_engine_a_check_on_the_answer_only(loaded):
    assert prepare_job(runtime(loaded), request()).engine_request.stop_text is None
    check = prepare_job(runtime(loaded), request(params={"stop": ["END"]})
                        ).engine_request.stop_text
    assert check is not None

    def ids(text: str) -> list[int]:
        return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    assert check(ids("<think>\nno END here, only thinking\n</think>\n\nan answer")) is False
    assert check(ids("<think>\nhmm\n</think>\n\nthe answer END")) is True


def test_priority_goes_to_the_engine(loaded):
    assert prepare_job(runtime(loaded), request(priority=9)).engine_request.priority == 9
    assert prepare_job(runtime(loaded), request()).engine_request.priority == 5


def test_a_template_that_opens_thinking_is_noticed_and_passed_on(loaded):
    opening = dataclasses.replace(loaded, tokenizer=OpeningTemplate(loaded.tokenizer))
    prepared = prepare_job(runtime(opening), request(params={"stop": ["END"]}))

    assert prepared.engine_request.prompt_ids[-2] == loaded.think.open_id
    assert prepared.prompt_opened_thinking is True
    assert prepared.engine_request.prompt_opened_thinking is True
    # The stop check knows the output starts inside a think block: a stop string there is
    # thinking, not answer.
    check = prepared.engine_request.stop_text
    thinking_only = loaded.tokenizer("the END of my thoughts", add_special_tokens=False)
    assert check(thinking_only["input_ids"]) is False


# ---------------------------------------------------------------- refusals and their boundaries


def test_the_model_asked_for_must_be_the_one_served(loaded):
    assert loaded.manifest.repo_id == TINY_MODEL_ID
    prepare_job(runtime(loaded), request(model=TINY_MODEL_ID))  # the served one: fine

    error = refused(runtime(loaded), request(model="someone/else"))
    assert (error.code, error.field, error.limit, error.value) == (
        "invalid_request", "model", TINY_MODEL_ID, "someone/else")


def test_more_messages_than_the_worker_takes(loaded):
    three = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
             {"role": "user", "content": "c"}]
    prepare_job(runtime(loaded, max_messages=3), request(three))

    error = refused(runtime(loaded, max_messages=2), request(three))
    assert (error.code, error.field, error.limit, error.value) == (
        "limit_exceeded", "messages", 2, 3)


def test_max_new_tokens_over_the_cap(loaded):
    error = refused(runtime(loaded, default_max_new_tokens=64, max_new_tokens_cap=100),
                    request(params={"max_new_tokens": 101}))
    assert (error.code, error.field, error.limit, error.value) == (
        "limit_exceeded", "params.max_new_tokens", 100, 101)


def test_a_prompt_over_the_workers_token_limit(loaded):
    size = len(template_ids(loaded, TINY_MESSAGES, enable_thinking=True))
    prepare_job(runtime(loaded, max_prompt_tokens=size), request())  # exactly at it: fine

    error = refused(runtime(loaded, max_prompt_tokens=size - 1), request())
    assert (error.code, error.field, error.limit, error.value) == (
        "limit_exceeded", "messages", size - 1, size)


def test_a_prompt_that_fills_the_models_context(loaded):
    size = len(template_ids(loaded, TINY_MESSAGES, enable_thinking=True))
    tight = dataclasses.replace(loaded, context_length=size)
    error = refused(runtime(tight), request(params={"max_new_tokens": 1}))
    assert (error.code, error.field, error.limit, error.value) == (
        "limit_exceeded", "messages", size, size)


def test_prompt_plus_max_new_tokens_must_fit_the_models_context(loaded):
    size = len(template_ids(loaded, TINY_MESSAGES, enable_thinking=True))
    context = size + 10
    tight = dataclasses.replace(loaded, context_length=context)
    fits = prepare_job(runtime(tight), request(params={"max_new_tokens": 10}))
    assert fits.engine_request.token_budget == context

    error = refused(runtime(tight), request(params={"max_new_tokens": 11}))
    assert (error.code, error.field, error.limit, error.value) == (
        "limit_exceeded", "params.max_new_tokens", context, context + 1)


def test_a_model_without_a_known_context_only_has_the_workers_limits(loaded):
    unknown = dataclasses.replace(loaded, context_length=None)
    prepared = prepare_job(runtime(unknown, max_new_tokens_cap=4096),
                           request(params={"max_new_tokens": 4096}))
    assert prepared.engine_request.max_new_tokens == 4096
