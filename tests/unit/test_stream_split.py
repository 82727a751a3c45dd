"""The live split (StreamSplitter) and its incremental decoder: whatever the pieces, they add
up to the final split's texts, multi-byte characters split across tokens included."""

from __future__ import annotations

import random

import pytest

from worker.pipeline.reasoning import (
    IncrementalDecoder,
    StreamSplitter,
    ThinkTokens,
    decode_part,
    split_reasoning,
)

TEXTS = [
    "plain ascii",
    "naïve café — ünïcödé",
    "数一数：一、二、三。",
    "emoji 👋🏽 and 🇫🇷 flags",
    "\n\nleading and trailing newlines\n\n",
]


class ByteTokenizer:
    """One token per UTF-8 byte: every multi-byte character is split across tokens."""

    def __call__(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


class CountingTokenizer(ByteTokenizer):
    def __init__(self) -> None:
        self.decoded = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return super().decode(ids, skip_special_tokens)


@pytest.fixture(scope="module")
def qwen():
    from chatqueue_dev.models import build_qwen_tokenizer

    return build_qwen_tokenizer()


def chunks(ids: list[int], seed: int) -> list[list[int]]:
    rng, out, i = random.Random(seed), [], 0
    while i < len(ids):
        step = rng.choice([1, 1, 2, 3, 7])
        out.append(ids[i:i + step])
        i += step
    return out


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_incremental_decoding_equals_one_decode_bytes_split_across_tokens(text, seed):
    tokenizer = ByteTokenizer()
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.feed(chunk) for chunk in chunks(tokenizer(text), seed)]
    assert all("\ufffd" not in piece for piece in pieces)  # never half a character
    assert "".join(pieces) + decoder.finish() == text


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_decoding_equals_one_decode_with_qwens_tokenizer(qwen, text):
    ids = qwen(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(qwen)
    pieces = [decoder.feed([token]) for token in ids]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) + decoder.finish() == qwen.decode(ids, skip_special_tokens=True)


def test_an_incomplete_character_at_the_end_shows_as_a_whole_decode_shows_it():
    tokenizer = ByteTokenizer()
    ids = tokenizer("ok 👋")[:-1]
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.feed(ids[:3]) == "ok "
    assert decoder.feed(ids[3:]) == ""  # waits for the character's last byte
    assert "ok " + decoder.finish() == tokenizer.decode(ids)


def test_each_event_decodes_a_small_window_not_everything_so_far():
    tokenizer = CountingTokenizer()
    decoder = IncrementalDecoder(tokenizer)
    ids = tokenizer("a long answer " * 200)
    for token in ids:
        decoder.feed([token])
    assert tokenizer.decoded < 2 * (IncrementalDecoder.WINDOW + 1) * len(ids)  # linear


@pytest.mark.parametrize("opened", [False, True], ids=["model-opens", "template-opens"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_the_live_split_adds_up_to_the_final_split(qwen, opened, seed):
    think = ThinkTokens.from_tokenizer(qwen)
    text = "\n数一数：一、二 👋🏽\n\n</think>\n\nnaïve café 🇫🇷\n<|im_end|>"
    ids = qwen(text if opened else "<think>" + text, add_special_tokens=False)["input_ids"]
    splitter = StreamSplitter(qwen, think, prompt_opened_thinking=opened)
    got = {"thinking": "", "content": ""}
    for chunk in chunks(ids, seed):
        for part, piece in splitter.feed(chunk):
            assert "\ufffd" not in piece
            got[part] += piece
    for part, piece in splitter.finish():
        got[part] += piece
    split = split_reasoning(ids, think, prompt_opened_thinking=opened)
    assert got == {"thinking": decode_part(qwen, split.thinking_ids, think),
                   "content": decode_part(qwen, split.content_ids, think)}
    assert got["thinking"].startswith("数") and got["content"].endswith("🇫🇷")
