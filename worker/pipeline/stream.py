"""Incremental version of the split stage: new token ids -> pieces of `thinking` / `content`.

Concatenated, the pieces of each part equal what `split_reasoning` + `decode_part` give for the
finished output when the output has at most one `</think>` (every model we know): a part's
leading and trailing newlines are held back until more text shows they are inside the part,
and so is an incomplete UTF-8 sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from worker.pipeline.reasoning import ThinkTokens, decode_part

Part = Literal["thinking", "content"]
_HELD = "\n\ufffd"


class StreamSplitter:
    def __init__(self, tokenizer: Any, think: ThinkTokens, *, prompt_opened_thinking: bool) -> None:
        self.tokenizer = tokenizer
        self.think = think
        self.part: Part | None = "thinking" if prompt_opened_thinking else None
        self.part_ids: list[int] = []
        self.emitted = ""

    def feed(self, ids: Sequence[int]) -> list[tuple[Part, str]]:
        pieces: list[tuple[Part, str]] = []
        for token in ids:
            if self.part is None:
                self.part = "thinking" if token == self.think.open_id else "content"
            if token == self.think.close_id and self.part == "thinking":
                pieces += self._flush(final=True)
                self.part, self.part_ids, self.emitted = "content", [], ""
                continue
            self.part_ids.append(token)
        return pieces + self._flush(final=False)

    def finish(self) -> list[tuple[Part, str]]:
        return self._flush(final=True)

    def _flush(self, *, final: bool) -> list[tuple[Part, str]]:
        if self.part is None:
            return []
        text = decode_part(self.tokenizer, self.part_ids, self.think, strip=False).lstrip("\n")
        visible = text.rstrip("\n") if final else text.rstrip(_HELD)
        if not visible.startswith(self.emitted) or len(visible) == len(self.emitted):
            return []
        piece, self.emitted = visible[len(self.emitted):], visible
        return [(self.part, piece)]
