"""Last stage: new token ids -> `thinking` and `content`, split at the LAST `</think>` by id."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class ThinkTokens:
    """The ids of the think tags in this tokenizer; None where the model has no such token."""

    open_id: int | None
    close_id: int | None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ThinkTokens:
        vocab = tokenizer.get_vocab()
        return cls(open_id=vocab.get(THINK_OPEN), close_id=vocab.get(THINK_CLOSE))


@dataclass(frozen=True)
class ReasoningSplit:
    thinking_ids: list[int]
    content_ids: list[int]

    @property
    def thinking_tokens(self) -> int:
        """Tokens spent thinking, tags included: what the thinking cost in generated tokens."""
        return len(self.thinking_ids)


def prompt_opens_thinking(prompt_ids: Sequence[int], think: ThinkTokens) -> bool:
    """True when the template itself opened a think block the model must close (Qwen3-2507)."""
    if think.open_id is None or think.open_id not in prompt_ids:
        return False
    last_open = len(prompt_ids) - 1 - list(reversed(prompt_ids)).index(think.open_id)
    return think.close_id not in prompt_ids[last_open:]


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
    if think.close_id is None:
        return ReasoningSplit(thinking_ids=[], content_ids=ids)
    if think.close_id in ids:
        cut = len(ids) - list(reversed(ids)).index(think.close_id)
        return ReasoningSplit(thinking_ids=ids[:cut], content_ids=ids[cut:])
    if prompt_opened_thinking or (think.open_id is not None and think.open_id in ids):
        return ReasoningSplit(thinking_ids=ids, content_ids=[])
    return ReasoningSplit(thinking_ids=[], content_ids=ids)


def decode_part(
    tokenizer: Any, ids: Sequence[int], think: ThinkTokens, *, strip: bool = True
) -> str:
    """Text of one part, without the think tags (removed by id: some tokenizers mark them as
    ordinary added tokens that skip_special_tokens keeps) and without the newlines around it."""
    tags = {think.open_id, think.close_id}
    text = str(tokenizer.decode([i for i in ids if i not in tags], skip_special_tokens=True))
    return text.strip("\n") if strip else text
