"""Stage 1: messages -> the prompt text, through the model's own chat template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from producer.schemas import ChatMessage
from worker.pipeline.reasoning import strip_history_thinking


def build_prompt(tokenizer: Any, messages: Sequence[ChatMessage], *, enable_thinking: bool) -> str:
    """Render the conversation and open the assistant's turn.

    `enable_thinking` reaches templates that know it (Qwen3 puts an empty think block into the
    prompt when it is False); other templates ignore the extra variable.
    """
    conversation = [
        {"role": m.role, "content": strip_history_thinking(m.content) if m.role == "assistant"
         else m.content}
        for m in messages
    ]
    return str(
        tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=True,
            enable_thinking=enable_thinking,
        )
    )


__all__ = ["build_prompt", "strip_history_thinking"]
