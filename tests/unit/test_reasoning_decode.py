"""Decoding the split parts with the real Qwen tokenizer: tags stripped by id, newlines trimmed."""

from __future__ import annotations

import pytest

from worker.pipeline.prompt import strip_history_thinking
from worker.pipeline.reasoning import ThinkTokens, decode_part, split_reasoning


@pytest.fixture(scope="module")
def tokenizer():
    from chatqueue_dev.models import build_qwen_tokenizer

    return build_qwen_tokenizer()


def test_decoded_parts_have_no_tags(tokenizer):
    think = ThinkTokens.from_tokenizer(tokenizer)
    text = "<think>\nI should greet.\n</think>\n\nHello there!<|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    split = split_reasoning(ids, think)

    assert decode_part(tokenizer, split.thinking_ids, think) == "I should greet."
    assert decode_part(tokenizer, split.content_ids, think) == "Hello there!"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        pytest.param("<think>\nhmm\n</think>\n\nAnswer", "Answer", id="with-thinking"),
        pytest.param("Answer", "Answer", id="without"),
    ],
)
def test_history_turns_lose_their_thinking(content, expected):
    assert strip_history_thinking(content) == expected
