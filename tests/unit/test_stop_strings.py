"""Stop strings: where the answer ends, what a stream may send, and the engine's per-step check
(with the real Qwen tokenizer)."""

from __future__ import annotations

import pytest

from worker.pipeline.reasoning import ThinkTokens, decode_part, split_reasoning
from worker.pipeline.stop import (
    StopStringCheck,
    StopStringFilter,
    held_back,
    truncate_at_stop,
)


@pytest.mark.parametrize(
    ("text", "stops", "expected"),
    [
        pytest.param("Hello world. Bye", ["."], ("Hello world", True), id="one"),
        pytest.param("a STOP b END", ["END", "STOP"], ("a ", True), id="earliest-wins"),
        pytest.param("nothing here", ["zz"], ("nothing here", False), id="absent"),
        pytest.param("STOP at once", ["STOP"], ("", True), id="at-start"),
    ],
)
def test_truncate_at_stop(text, stops, expected):
    assert truncate_at_stop(text, stops) == expected


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [
        pytest.param("Hello ST", ["STOP"], 2, id="partial"),
        pytest.param("Hello", ["STOP"], 0, id="none"),
        pytest.param("ab\n", ["\n\n", "b\nx"], 2, id="longest-of-several"),
        pytest.param("xS", ["S"], 0, id="whole-stop-is-not-held"),
    ],
)
def test_held_back(text, stops, held):
    assert held_back(text, stops) == held


@pytest.mark.parametrize(
    "pieces",
    [
        pytest.param(["Hel", "lo S", "TO", "P and more"], id="split-stop"),
        pytest.param(["Hello STOP"], id="one-piece"),
        pytest.param(["S", "T", "x", "STOP"], id="false-start"),
        pytest.param(["no stop at all", " S"], id="held-tail-at-end"),
    ],
)
def test_stream_filter_sends_what_the_result_keeps(pieces):
    stops = ["STOP"]
    stream = StopStringFilter(stops)
    sent = [stream.feed(piece) for piece in pieces] + [stream.finish()]
    whole, _ = truncate_at_stop("".join(pieces), stops)
    assert "".join(sent) == whole
    assert all("STOP" not in piece for piece in sent)


@pytest.fixture(scope="module")
def tokenizer():
    from chatqueue_dev.models import build_qwen_tokenizer

    return build_qwen_tokenizer()


def first_stop(check, ids):
    """How many ids the engine generates before the check ends the row, or None."""
    for count in range(1, len(ids) + 1):
        if check(ids[:count]):
            return count
    return None


@pytest.mark.parametrize(
    ("text", "stops", "answer"),
    [
        pytest.param("Paris is big. It is old.", ["."], "Paris is big", id="plain"),
        pytest.param("<think>\nfirst. second.\n</think>\n\nYes. No.", ["."], "Yes",
                     id="thinking-not-searched"),
        pytest.param("Ünïcödé → done END tail", [" END"], "Ünïcödé → done", id="multibyte"),
        pytest.param("Answer without it", ["zzz"], "Answer without it", id="absent"),
    ],
)
def test_engine_check_ends_the_row_at_the_stop_string(tokenizer, text, stops, answer):
    think = ThinkTokens.from_tokenizer(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    check = StopStringCheck(tokenizer, think, stops, prompt_opened_thinking=False)
    count = first_stop(check, ids)
    kept = ids if count is None else ids[:count]
    split = split_reasoning(kept, think)
    content, _ = truncate_at_stop(decode_part(tokenizer, split.content_ids, think), stops)
    assert content == answer
    if count is not None:  # it ended at the first token that completed a stop string
        shorter = split_reasoning(ids[:count - 1], think)
        before = decode_part(tokenizer, shorter.content_ids, think, strip=False)
        assert truncate_at_stop(before, stops)[1] is False
