"""The thinking budget from request to output, on the tiny model without servers, counted by
hand as README states the rule: a thinking token is a generated token inside an open think block
(opened by the model's `<think>` or by the chat template), the tags not counted; the budget
counts by it, the close's leading newline included, so `max_thinking_tokens=N` reports at most
N, and the model still answers."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from producer.schemas import ChatRequest
from tests.support.templates import OpeningTemplate
from worker.engine import Engine, EngineLimits
from worker.manifest import read_manifest
from worker.model import load_model
from worker.pipeline.reasoning import decode_part, split_reasoning
from worker.service import prepare_job
from worker.settings import WorkerSettings

QUESTION = [{"role": "user", "content": "Hi! Who are you?"}]


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, read_manifest(tiny_model_dir),
                      device=torch.device("cpu"), dtype="float32")


@pytest.fixture(scope="module")
def engine(loaded):
    engine = Engine(loaded.model, pad_id=loaded.pad_id, limits=EngineLimits(),
                    think=loaded.think).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def free_runs(engine, loaded):
    """Each opener's output without a budget, computed once."""
    return {opener: run(engine, model_for(loaded, opener), None)
            for opener in ("model", "template")}


def model_for(loaded: Any, opener: str) -> Any:
    return loaded if opener == "model" else dataclasses.replace(
        loaded, tokenizer=OpeningTemplate(loaded.tokenizer))


def run(engine: Engine, loaded: Any, budget: int | None) -> tuple[list[int], bool, str]:
    params = {"do_sample": False, "max_new_tokens": 64}
    if budget is not None:
        params["max_thinking_tokens"] = budget
    runtime = SimpleNamespace(settings=WorkerSettings(_env_file=None), loaded=loaded)
    prepared = prepare_job(runtime, ChatRequest.model_validate(
        {"messages": QUESTION, "params": params}))
    output = engine.generate(prepared.engine_request)
    return output.token_ids, prepared.prompt_opened_thinking, output.finish_reason


def inside_the_think_block(ids: list[int], think: Any, *, opened: bool) -> list[int]:
    """By hand: the tokens after the opening (the model's `<think>`, or the output's start when
    the template opened the block) and before the `</think>` that closes it."""
    start = 0 if opened else ids.index(think.open_id) + 1
    end = ids.index(think.close_id, start) if think.close_id in ids[start:] else len(ids)
    return [token for token in ids[start:end] if token not in (think.open_id, think.close_id)]


@pytest.mark.parametrize("budget", [0, 1, 2, 5])
@pytest.mark.parametrize("opener", ["model", "template"])
def test_a_budget_of_n_thinks_at_most_n_tokens_reports_them_and_then_answers(
        engine, loaded, free_runs, budget, opener):
    free, opened, _ = free_runs[opener]
    capped, opened_capped, finish = run(engine, model_for(loaded, opener), budget)
    assert opened == opened_capped == (opener == "template")
    think = loaded.think

    free_thinking = inside_the_think_block(free, think, opened=opened)
    thinking = inside_the_think_block(capped, think, opened=opened)
    assert len(free_thinking) > budget + 1  # left alone the model thinks longer: the budget bites

    # The bound, and one count: what usage.thinking_tokens reports is the count by hand.
    assert len(thinking) <= budget
    assert split_reasoning(capped, think, prompt_opened_thinking=opened).thinking_tokens == len(
        thinking)
    # The model's own thoughts up to the budget, then the close as the template writes it
    # ("\n</think>\n\n"), its newline inside the budget when there is room for it.
    close = list(loaded.close_thinking_ids)
    at_tag = close.index(think.close_id)
    if budget >= at_tag:
        assert thinking == free_thinking[:budget - at_tag] + close[:at_tag]
    else:
        assert thinking == free_thinking[:budget]
    end_of_thinking = capped.index(think.close_id)
    assert capped[end_of_thinking:end_of_thinking + len(close) - at_tag] == close[at_tag:]
    # ... and the model answers after it, and stops by itself.
    split = split_reasoning(capped, think, prompt_opened_thinking=opened)
    assert decode_part(loaded.tokenizer, split.content_ids, think) != ""
    assert finish == "stop"


@pytest.mark.parametrize("budget", [60, 1000])
def test_a_budget_the_model_never_reaches_changes_nothing(engine, loaded, free_runs, budget):
    free, _, _ = free_runs["model"]
    assert len(inside_the_think_block(free, loaded.think, opened=False)) <= budget
    assert run(engine, loaded, budget)[0] == free
