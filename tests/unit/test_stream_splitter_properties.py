"""The live split against the final split, over drawn outputs and drawn chunkings, with the tiny
test model's own tokenizer: whatever the shape of the output (thinking then answer, a think
block the template opened, thinking cut off before `</think>`, no think block at all, a model
without think tokens) and however its tokens arrive, the stream's pieces come in order, never
carry a tag or half a character, and add up to what the result holds."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from worker.pipeline.reasoning import StreamSplitter, ThinkTokens, decode_part, split_reasoning

PROPERTIES = settings(max_examples=80, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow,
                                             HealthCheck.function_scoped_fixture])

# Characters that tokenize into several byte-level tokens (CJK, accents, emoji with modifiers
# and joiners, flags), newlines around and inside the parts, and plain text. No "<": the think
# tags in a part's text would be tags, not text.
ALPHABET = st.sampled_from(
    [*"abc xyz.!?", "\n", "\n\n", " \n", "数", "一、", "：", "é", "ï", "—", "👋🏽",
     "🇫🇷", "👨\u200d👩\u200d👧", "\u00a0", "\t"])
texts = st.lists(ALPHABET, max_size=25).map("".join)

SHAPES = ["model-opens", "template-opens", "cut-off-thinking", "template-opens-cut-off",
          "no-think-block", "model-without-think-tokens"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)


def output_text(shape: str, thinking: str, content: str, end: str) -> tuple[str, bool]:
    """The generated text of one shape, and whether the prompt opened the think block."""
    return {
        "model-opens": (f"<think>{thinking}</think>{content}{end}", False),
        "template-opens": (f"{thinking}</think>{content}{end}", True),
        "cut-off-thinking": (f"<think>{thinking}", False),
        "template-opens-cut-off": (thinking, True),
        "no-think-block": (f"{content}{end}", False),
        "model-without-think-tokens": (f"<think>{thinking}</think>{content}{end}", False),
    }[shape]


def chunked(ids: list[int], sizes: list[int]) -> list[list[int]]:
    chunks, start = [], 0
    for size in sizes:
        if start >= len(ids):
            break
        chunks.append(ids[start:start + size])
        start += size
    if start < len(ids):
        chunks.append(ids[start:])
    return chunks


def stream(tokenizer, think, ids, opened, sizes) -> list[tuple[str, str]]:
    splitter = StreamSplitter(tokenizer, think, prompt_opened_thinking=opened)
    pieces = []
    for chunk in chunked(ids, sizes):
        pieces += splitter.feed(chunk)
    return pieces + splitter.finish()


@PROPERTIES
@given(shape=st.sampled_from(SHAPES), thinking=texts, content=texts,
       end=st.sampled_from(["", "<|im_end|>"]),
       sizes=st.lists(st.integers(1, 5), max_size=60))
def test_the_live_split_adds_up_to_the_final_split(tokenizer, shape, thinking, content, end,
                                                   sizes):
    think = (ThinkTokens(open_id=None, close_id=None) if shape == "model-without-think-tokens"
             else ThinkTokens.from_tokenizer(tokenizer))
    text, opened = output_text(shape, thinking, content, end)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    pieces = stream(tokenizer, think, ids, opened, sizes)

    final = split_reasoning(ids, think, prompt_opened_thinking=opened)
    expected = {"thinking": decode_part(tokenizer, final.thinking_ids, think),
                "content": decode_part(tokenizer, final.content_ids, think)}
    got = {part: "".join(piece for p, piece in pieces if p == part)
           for part in ("thinking", "content")}
    assert got == expected
    # In order: no thinking after the answer began; no empty event; never half a character,
    # never a tag of a model that has them.
    parts = [part for part, _ in pieces]
    assert parts == sorted(parts, key=("thinking", "content").index)
    assert all(piece for _, piece in pieces)
    assert all("\ufffd" not in piece for _, piece in pieces)
    if think.close_id is not None:
        assert all("<think>" not in piece and "</think>" not in piece for _, piece in pieces)


@pytest.mark.parametrize(
    ("shape", "thinking", "content"),
    [
        pytest.param("model-opens", "\nI think.\n", "\n\nThe answer.", id="model-opens"),
        pytest.param("template-opens", "\nI think.\n", "\n\nThe answer.", id="template-opens"),
        pytest.param("cut-off-thinking", "\nStill thinking 数一数", "", id="cut-off-thinking"),
        pytest.param("template-opens-cut-off", "\nStill 👋🏽", "", id="template-opens-cut-off"),
        pytest.param("no-think-block", "", "Just an answer 🇫🇷", id="no-think-block"),
    ],
)
def test_each_shape_one_token_at_a_time(tokenizer, shape, thinking, content):
    """The worked examples: which part each shape's text belongs to, read token by token."""
    think = ThinkTokens.from_tokenizer(tokenizer)
    text, opened = output_text(shape, thinking, content, "<|im_end|>")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    pieces = stream(tokenizer, think, ids, opened, [1] * len(ids))

    got = {part: "".join(piece for p, piece in pieces if p == part)
           for part in ("thinking", "content")}
    assert got == {"thinking": thinking.strip("\n"), "content": content.strip("\n")}


def test_the_answer_starts_streaming_before_the_output_ends(tokenizer):
    """Live, not buffered: each part's text goes out as its tokens arrive, not at finish()."""
    think = ThinkTokens.from_tokenizer(tokenizer)
    ids = tokenizer("<think>\nfirst second third\n</think>\n\nalpha beta gamma delta",
                    add_special_tokens=False)["input_ids"]
    splitter = StreamSplitter(tokenizer, think, prompt_opened_thinking=False)
    fed = [splitter.feed([token]) for token in ids]

    close_at = ids.index(think.close_id)
    assert "".join(piece for pieces in fed[:close_at] for _, piece in pieces).startswith(
        "first second")
    assert "".join(piece for pieces in fed[close_at:] for _, piece in pieces).startswith(
        "alpha beta gamma")
    assert splitter.finish() == []  # nothing was held back: the output ends in plain text


def test_a_split_character_waits_for_its_last_token(tokenizer):
    think = ThinkTokens.from_tokenizer(tokenizer)
    ids = tokenizer("ok 👋🏽", add_special_tokens=False)["input_ids"]
    assert len(ids) > 3  # the emoji and its modifier take several byte-level tokens
    splitter = StreamSplitter(tokenizer, think, prompt_opened_thinking=False)
    pieces = [splitter.feed([token]) for token in ids]

    text = "".join(piece for step in pieces for _, piece in step)
    assert "\ufffd" not in text
    assert text + "".join(piece for _, piece in splitter.finish()) == "ok 👋🏽"
