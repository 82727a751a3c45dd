"""Reasoning in one place: the think tags, the prompt's opened think block, what counts as a
thinking token (for the budget and for `usage.thinking_tokens` alike), the budget's close, the
live split of a stream and the final split at the LAST `</think>`, by id.

A thinking token is a generated token inside an open think block -- opened by the model's
`<think>` or by the chat template -- other than the tags themselves. The engine counts them
one by one with `advance_thinking`; `usage.thinking_tokens` is `count_thinking_tokens` of the
whole output: the same fold, so a job with `max_thinking_tokens=N` reports at most N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

Part = Literal["thinking", "content"]


@dataclass(frozen=True)
class ThinkTokens:
    """The ids of the think tags in this tokenizer; None where the model has no such token."""

    open_id: int | None
    close_id: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ThinkTokens:
        vocab = tokenizer.get_vocab()
        return cls(open_id=vocab.get(THINK_OPEN), close_id=vocab.get(THINK_CLOSE))

    @property
    def tags(self) -> frozenset[int]:
        return frozenset(i for i in (self.open_id, self.close_id) if i is not None)


@dataclass(frozen=True)
class ReasoningSplit:
    thinking_ids: list[int]
    content_ids: list[int]
    thinking_tokens: int  # by the module's rule: inside an open think block, tags left out


def strip_history_thinking(content: str) -> str:
    """Earlier assistant turns go back without their reasoning (the Qwen3 model card's rule)."""
    _, closed, tail = content.rpartition(THINK_CLOSE)
    return tail.lstrip("\n") if closed else content


def starts_thinking(first_token: int, think: ThinkTokens, *, prompt_opened_thinking: bool) -> bool:
    """Whether an output that begins with `first_token` begins inside a think block."""
    return think.close_id is not None and (prompt_opened_thinking or first_token == think.open_id)


def prompt_opens_thinking(prompt_ids: Sequence[int], think: ThinkTokens) -> bool:
    """True when the template itself opened a think block the model must close (Qwen3-2507).
    A model without `</think>` has no think block to close: its output is all content."""
    if think.open_id is None or think.close_id is None or think.open_id not in prompt_ids:
        return False
    last_open = len(prompt_ids) - 1 - list(reversed(prompt_ids)).index(think.open_id)
    return think.close_id not in prompt_ids[last_open:]


def advance_thinking(token: int, think: ThinkTokens, *, thinking: bool) -> tuple[bool, int]:
    """One generated token: whether a think block is open after it, and 1 if it is a thinking
    token (0 otherwise)."""
    if think.close_id is None:
        return False, 0
    if token == think.open_id:
        return True, 0
    if token == think.close_id:
        return False, 0
    return thinking, int(thinking)


def count_thinking_tokens(output_ids: Sequence[int], think: ThinkTokens, *,
                          prompt_opened_thinking: bool = False) -> int:
    thinking, count = prompt_opened_thinking, 0
    for token in output_ids:
        thinking, counted = advance_thinking(token, think, thinking=thinking)
        count += counted
    return count


def close_for_budget(close_ids: Sequence[int], think: ThinkTokens, *, spent: int,
                     budget: int | None) -> list[int]:
    """What the engine writes instead of the model's next token while a think block is open:
    nothing while the model may still think, else the close as the template writes it (Qwen3:
    "\\n</think>\\n\\n"). The newline before the tag is inside the block and counts, so the
    close starts one token early; when even that would pass the budget, it starts at the tag."""
    if budget is None or think.close_id is None or think.close_id not in close_ids:
        return []
    at_tag = list(close_ids).index(think.close_id)
    lead = sum(1 for i in close_ids[:at_tag] if i not in think.tags)
    if spent + lead < budget:
        return []
    return list(close_ids if spent + lead <= budget else close_ids[at_tag:])


def split_reasoning(
    output_ids: Sequence[int], think: ThinkTokens, *, prompt_opened_thinking: bool = False
) -> ReasoningSplit:
    """Split generated ids into thinking and content.

    - No `</think>` in the vocabulary: everything is content.
    - A `</think>` in the output: thinking is all before the last one, content all after it.
    - A think block opened (by the output or the prompt) but never closed -- typically cut off
      by max_new_tokens -- is all thinking, as SGLang and current vLLM return it.
    """
    ids = list(output_ids)
    count = count_thinking_tokens(ids, think, prompt_opened_thinking=prompt_opened_thinking)
    if think.close_id is None:
        return ReasoningSplit(thinking_ids=[], content_ids=ids, thinking_tokens=0)
    if think.close_id in ids:
        cut = len(ids) - list(reversed(ids)).index(think.close_id)
        return ReasoningSplit(thinking_ids=ids[:cut], content_ids=ids[cut:],
                              thinking_tokens=count)
    if prompt_opened_thinking or (think.open_id is not None and think.open_id in ids):
        return ReasoningSplit(thinking_ids=ids, content_ids=[], thinking_tokens=count)
    return ReasoningSplit(thinking_ids=[], content_ids=ids, thinking_tokens=0)


def decode_part(
    tokenizer: Any, ids: Sequence[int], think: ThinkTokens, *, strip: bool = True
) -> str:
    """Text of one part, without the think tags (removed by id: some tokenizers mark them as
    ordinary added tokens that skip_special_tokens keeps) and without the newlines around it."""
    tags = think.tags
    text = str(tokenizer.decode([i for i in ids if i not in tags], skip_special_tokens=True))
    return text.strip("\n") if strip else text


class IncrementalDecoder:
    """Token ids in, new text out, decoding only a small window each time (vLLM's incremental
    detokenization): the text of the ids since `_prefix` minus the text of those already read.
    A text that ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next ids.
    Concatenated, the pieces plus `finish()` equal one decode of all the ids."""

    WINDOW = 6  # tokens of context kept before the unread ones (a tokenizer's leading-space rule)

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # the window starts here
        self._read = 0  # the ids before this have been turned into text

    def feed(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        if len(self.ids) == self._read:
            return ""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        self._prefix = max(self._read, len(self.ids) - self.WINDOW)
        self._read = len(self.ids)
        return new_text[len(prefix_text):]

    def finish(self) -> str:
        """The rest, an incomplete sequence included (as a whole decode shows it)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return new_text[len(prefix_text):]

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True)) if ids else ""


class StreamSplitter:
    """The live split: new token ids -> pieces of `thinking` / `content`.

    Concatenated, the pieces of each part equal what `split_reasoning` + `decode_part` give for
    the finished output when the output has at most one `</think>` (every model we know): a
    part's leading newlines are dropped, its trailing ones held back until more text shows
    they are inside the part, and an incomplete UTF-8 sequence waits for its next bytes."""

    def __init__(self, tokenizer: Any, think: ThinkTokens, *, prompt_opened_thinking: bool) -> None:
        self.tokenizer = tokenizer
        self.think = think
        self.part: Part | None = "thinking" if prompt_opened_thinking else None
        self._decoder = IncrementalDecoder(tokenizer)
        self._shown = False  # this part has sent text
        self._newlines = ""  # this part's trailing newlines, held back

    def feed(self, ids: Sequence[int]) -> list[tuple[Part, str]]:
        pieces: list[tuple[Part, str]] = []
        run: list[int] = []
        for token in ids:
            if self.part is None:
                self.part = "thinking" if starts_thinking(
                    token, self.think, prompt_opened_thinking=False) else "content"
            if token == self.think.close_id and self.part == "thinking":
                pieces += self._emit(self._decoder.feed(run) + self._decoder.finish(), final=True)
                run = []
                self.part, self._decoder = "content", IncrementalDecoder(self.tokenizer)
                self._shown, self._newlines = False, ""
                continue
            if token not in self.think.tags:
                run.append(token)
        if self.part is None:
            return pieces
        return pieces + self._emit(self._decoder.feed(run), final=False)

    def finish(self) -> list[tuple[Part, str]]:
        if self.part is None:
            return []
        return self._emit(self._decoder.finish(), final=True)

    def _emit(self, text: str, *, final: bool) -> list[tuple[Part, str]]:
        assert self.part is not None
        text = self._newlines + text
        if not self._shown:
            text = text.lstrip("\n")
        visible = text.rstrip("\n")
        self._newlines = "" if final else text[len(visible):]
        if not visible:
            return []
        self._shown = True
        return [(self.part, visible)]
