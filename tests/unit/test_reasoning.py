"""The thinking/content split, table-driven, with Qwen's real ids and with a model lacking
</think>."""

from __future__ import annotations

import pytest

from worker.pipeline.reasoning import (
    ThinkTokens,
    advance_thinking,
    close_for_budget,
    count_thinking_tokens,
    prompt_opens_thinking,
    split_reasoning,
)

# Qwen2/2.5/3 ids (tests may name them; product code looks them up from the tokenizer).
OPEN, CLOSE, IM_END = 151667, 151668, 151645
QWEN = ThinkTokens(open_id=OPEN, close_id=CLOSE)
NO_THINK_MODEL = ThinkTokens(open_id=None, close_id=None)


@pytest.mark.parametrize(
    ("output", "think", "opened", "thinking", "content", "counted"),
    [
        pytest.param([OPEN, 1, 2, CLOSE, 3, 4, IM_END], QWEN, False,
                     [OPEN, 1, 2, CLOSE], [3, 4, IM_END], 2, id="think-then-answer"),
        pytest.param([OPEN, 1, CLOSE, 2, CLOSE, 3], QWEN, False,
                     [OPEN, 1, CLOSE, 2, CLOSE], [3], 1, id="split-at-last-close"),
        pytest.param([OPEN, 1, 2, 3], QWEN, False, [OPEN, 1, 2, 3], [], 3,
                     id="cut-off-inside-thinking"),
        pytest.param([1, 2, 3], QWEN, True, [1, 2, 3], [], 3,
                     id="template-opened-thinking-never-closed"),
        pytest.param([1, CLOSE, 2], QWEN, True, [1, CLOSE], [2], 1,
                     id="template-opened-thinking-closed"),
        pytest.param([1, 2, IM_END], QWEN, False, [], [1, 2, IM_END], 0, id="no-think-block"),
        pytest.param([1, CLOSE, 2], NO_THINK_MODEL, False, [], [1, CLOSE, 2], 0,
                     id="model-without-think-token"),
        pytest.param([1, 2], NO_THINK_MODEL, True, [], [1, 2], 0,
                     id="model-without-think-token-prompt-opened"),
        pytest.param([], QWEN, False, [], [], 0, id="empty-output"),
    ],
)
def test_split(output, think, opened, thinking, content, counted):
    split = split_reasoning(output, think, prompt_opened_thinking=opened)
    assert (split.thinking_ids, split.content_ids) == (thinking, content)
    # One rule: tokens inside an open think block, the tags left out.
    assert split.thinking_tokens == counted
    assert count_thinking_tokens(output, think, prompt_opened_thinking=opened) == counted


NL = 198  # "\n" in Qwen's vocabulary; the close the template writes: "\n</think>\n\n"
CLOSE_AS_WRITTEN = (NL, CLOSE, 271)


@pytest.mark.parametrize(
    ("spent", "budget", "forced"),
    [
        pytest.param(0, None, [], id="no-budget"),
        pytest.param(0, 5, [], id="room-left"),
        pytest.param(3, 5, [], id="room-for-one-more-and-the-newline"),
        pytest.param(4, 5, list(CLOSE_AS_WRITTEN), id="the-newline-fills-the-budget"),
        pytest.param(5, 5, [CLOSE, 271], id="full-budget-starts-at-the-tag"),
        pytest.param(0, 0, [CLOSE, 271], id="zero-budget"),
    ],
)
def test_the_budgets_close_never_passes_the_budget(spent, budget, forced):
    assert close_for_budget(CLOSE_AS_WRITTEN, QWEN, spent=spent, budget=budget) == forced


@pytest.mark.parametrize("budget", [0, 1, 2, 3, 7])
@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "template-opens"])
def test_a_model_that_would_think_forever_reports_at_most_its_budget(budget, opened):
    """The engine's steering, replayed: the model always wants to think more (token 5)."""
    generated: list[int] = [] if opened else [OPEN]
    thinking, spent, forced = True, 0, []
    while len(generated) < 40:
        if not forced and thinking:
            forced = close_for_budget(CLOSE_AS_WRITTEN, QWEN, spent=spent, budget=budget)
        token = forced.pop(0) if forced else (5 if thinking else IM_END)
        thinking, counted = advance_thinking(token, QWEN, thinking=thinking)
        spent += counted
        generated.append(token)
        if token == IM_END:
            break
    split = split_reasoning(generated, QWEN, prompt_opened_thinking=opened)
    assert split.thinking_tokens == spent <= budget
    assert split.content_ids[-1] == IM_END


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
