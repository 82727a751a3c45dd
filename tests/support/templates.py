"""Tokenizer wrappers for tests."""

from __future__ import annotations

from typing import Any


class OpeningTemplate:
    """A tokenizer behind a chat template that opens the think block itself, as Qwen3-2507's
    thinking models do: the output has no `<think>` of its own."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(*args, **kwargs) + "<think>\n"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer(*args, **kwargs)
