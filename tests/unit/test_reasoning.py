"""The thinking/content split, table-driven, with Qwen's real ids and with a model lacking
</think>."""

from __future__ import annotations

import pytest

from worker.pipeline.reasoning import (
    ThinkTokens,
    prompt_opens_thinking,
    split_reasoning,
)

# Qwen2/2.5/3 ids (tests may name them; product code looks them up from the tokenizer).
OPEN, CLOSE, IM_END = 151667, 151668, 151645
QWEN = ThinkTokens(open_id=OPEN, close_id=CLOSE)
NO_THINK_MODEL = ThinkTokens(open_id=None, close_id=None)


@pytest.mark.parametrize(
    ("output", "think", "opened", "thinking", "content"),
    [
        pytest.param([OPEN, 1, 2, CLOSE, 3, 4, IM_END], QWEN, False,
                     [OPEN, 1, 2, CLOSE], [3, 4, IM_END], id="think-then-answer"),
        pytest.param([OPEN, 1, CLOSE, 2, CLOSE, 3], QWEN, False,
                     [OPEN, 1, CLOSE, 2, CLOSE], [3], id="split-at-last-close"),
        pytest.param([OPEN, 1, 2, 3], QWEN, False, [OPEN, 1, 2, 3], [],
                     id="cut-off-inside-thinking"),
        pytest.param([1, 2, 3], QWEN, True, [1, 2, 3], [],
                     id="template-opened-thinking-never-closed"),
        pytest.param([1, CLOSE, 2], QWEN, True, [1, CLOSE], [2],
                     id="template-opened-thinking-closed"),
        pytest.param([1, 2, IM_END], QWEN, False, [], [1, 2, IM_END], id="no-think-block"),
        pytest.param([1, CLOSE, 2], NO_THINK_MODEL, False, [], [1, CLOSE, 2],
                     id="model-without-think-token"),
        pytest.param([], QWEN, False, [], [], id="empty-output"),
    ],
)
def test_split(output, think, opened, thinking, content):
    split = split_reasoning(output, think, prompt_opened_thinking=opened)
    assert (split.thinking_ids, split.content_ids) == (thinking, content)
    assert split.thinking_tokens == len(thinking)


@pytest.mark.parametrize(
    ("prompt", "opened"),
    [
        pytest.param([5, 6, OPEN, 7], True, id="open-at-end"),
        pytest.param([5, OPEN, 9, CLOSE, 7], False, id="empty-block-from-enable-thinking-false"),
        pytest.param([5, 6, 7], False, id="no-tags"),
    ],
)
def test_prompt_opens_thinking(prompt, opened):
    assert prompt_opens_thinking(prompt, QWEN) is opened


def test_think_tokens_come_from_the_tokenizer():
    class Vocab:
        def get_vocab(self):
            return {"<think>": 7, "</think>": 8, "a": 1}

    assert ThinkTokens.from_tokenizer(Vocab()) == ThinkTokens(open_id=7, close_id=8)
