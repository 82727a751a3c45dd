"""Stage 2: prompt text -> token ids."""

from __future__ import annotations

from typing import Any


def tokenize_prompt(tokenizer: Any, prompt: str) -> list[int]:
    # The chat template already wrote every special token the model expects (BOS included where
    # the template has one); letting the tokenizer add its own would double them.
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
