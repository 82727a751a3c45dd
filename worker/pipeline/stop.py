"""Stop strings (OpenAI's `stop`): the answer ends where one appears, and stops before it.

Three places need them, all here: the engine's per-step check (`StopStringCheck`, on the
decoded tail of the row's answer), the result (`truncate_at_stop`) and the stream
(`StopStringFilter`, which holds back a tail that could still become a stop string). Only the
answer (content) is searched: a thinking model's reasoning would hit common stops at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.pipeline.reasoning import ThinkTokens, decode_part, starts_thinking

# A character takes at most this many byte-level BPE tokens (one per UTF-8 byte).
_TOKENS_PER_CHAR = 4


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest stop string begins in `text`, or None."""
    found = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(found) if found else None


def truncate_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text before the earliest stop string, and whether one was found."""
    index = find_stop(text, stops)
    return (text, False) if index is None else (text[:index], True)


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is the start of a stop string (not all of one):
    text a stream must not send yet, since the next tokens may complete the stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


class StopStringCheck:
    """For the engine: has the row's answer so far come to contain a stop string?

    Checked after every token, so the newest match is the first one; only a window of the last
    tokens long enough to hold the longest stop string is decoded."""

    def __init__(self, tokenizer: Any, think: ThinkTokens, stops: Sequence[str], *,
                 prompt_opened_thinking: bool) -> None:
        self.tokenizer = tokenizer
        self.think = think
        self.stops = tuple(stops)
        self.window = _TOKENS_PER_CHAR * max(len(stop) for stop in self.stops) + 2
        self.prompt_opened_thinking = prompt_opened_thinking
        self._answering = think.close_id is None

    def __call__(self, generated: Sequence[int]) -> bool:
        if not generated:
            return False
        tail = list(generated[-self.window:])
        close = self.think.close_id
        if close is not None and close in tail:
            tail = tail[len(tail) - tail[::-1].index(close):]
            self._answering = True
        elif not self._answering:
            if starts_thinking(generated[0], self.think,
                               prompt_opened_thinking=self.prompt_opened_thinking):
                return False  # still inside the think block: not searched
            self._answering = True
        text = decode_part(self.tokenizer, tail, self.think, strip=False)
        return find_stop(text, self.stops) is not None


class StopStringFilter:
    """For the stream: the answer's pieces, cut before a stop string, never sending text that
    may turn out to be part of one. Concatenated, what it sends equals `truncate_at_stop` of
    the whole answer."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.pending += piece
        index = find_stop(self.pending, self.stops)
        if index is not None:
            sent, self.pending, self.stopped = self.pending[:index], "", True
            return sent
        keep = held_back(self.pending, self.stops)
        sent = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(self.pending) - keep:]
        return sent

    def finish(self) -> str:
        sent, self.pending = ("" if self.stopped else self.pending), ""
        return sent
