"""The baseline the tutorial teaches: one process, one model, one request at a time.

apply_chat_template -> tokenize -> model.generate -> slice off the prompt -> decode, exactly as
the Qwen3 model card's example does it, with no queue, no batching and no worker around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.model import resolve_dtype


@dataclass(frozen=True)
class TutorialModel:
    tokenizer: Any
    model: Any


@dataclass(frozen=True)
class RequestRun:
    prompt_index: int
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


def load_tutorial_model(model_dir: Path, device: torch.device, dtype: str) -> TutorialModel:
    """Load as the worker does: same folder, device and dtype setting, nothing downloaded."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=resolve_dtype(dtype, device=device, model_dir=model_dir),
        device_map=str(device), local_files_only=True,
    ).eval()
    return TutorialModel(tokenizer, model)


def generate_one(
    tm: TutorialModel, messages: list[dict[str, str]], *, max_new_tokens: int,
    enable_thinking: bool,
) -> tuple[int, list[int]]:
    """The tutorial's request path; returns (prompt tokens, generated ids)."""
    text = tm.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=enable_thinking
    )
    inputs = tm.tokenizer([text], return_tensors="pt").to(tm.model.device)
    with torch.inference_mode():
        output = tm.model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens,
            # No end-of-sequence token: generation runs on through EOS to max_new_tokens, as the
            # product's ignore_eos does, so both sides do the same work. (min_new_tokens would
            # too, but its logits processors mask the EOS ids over the whole vocabulary at every
            # step: 2-3x slower on the tiny model, a cost the tutorial does not have.)
            eos_token_id=None,
        )
    prompt_len = inputs["input_ids"].shape[1]
    new_ids = output[0][prompt_len:].tolist()
    tm.tokenizer.decode(new_ids, skip_special_tokens=True)  # part of the tutorial's cost
    return prompt_len, new_ids


def warm_up(tm: TutorialModel, messages: list[dict[str, str]], enable_thinking: bool) -> None:
    """One short request, so lazy initialisation is not billed to the first timed one (the
    worker warms up the same way at start)."""
    generate_one(tm, messages, max_new_tokens=2, enable_thinking=enable_thinking)


def run_request(
    tm: TutorialModel, index: int, messages: list[dict[str, str]], *, max_new_tokens: int,
    enable_thinking: bool,
) -> RequestRun:
    started = time.perf_counter()
    prompt_tokens, new_ids = generate_one(
        tm, messages, max_new_tokens=max_new_tokens, enable_thinking=enable_thinking
    )
    latency = time.perf_counter() - started
    if len(new_ids) != max_new_tokens:
        raise RuntimeError(
            f"baseline generated {len(new_ids)} tokens for prompt {index}, expected "
            f"{max_new_tokens}: the runs would not be comparable"
        )
    return RequestRun(index, prompt_tokens, len(new_ids), latency)


@dataclass(frozen=True)
class PaddedRun:
    """One left-padded `model.generate` over N prompts: what a user writes without a queue."""

    prompts: int
    prompt_tokens: list[int]
    padded_width: int  # every row's prompt is padded to the longest one
    completion_tokens: int  # all rows together
    wall_s: float


def padded_generate(
    tm: TutorialModel, prompts: list[list[dict[str, str]]], *, max_new_tokens: int,
    enable_thinking: bool,
) -> PaddedRun:
    """The tutorial's pipeline with the N prompts in one left-padded batch: template, tokenize,
    one greedy generate with EOS ignored, slice, decode -- all timed, as one request is."""
    started = time.perf_counter()
    texts = [
        tm.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
        for m in prompts
    ]
    pad_id = _pad_id(tm)
    inputs = tm.tokenizer(texts, return_tensors="pt", padding=True,
                          padding_side="left").to(tm.model.device)
    with torch.inference_mode():
        output = tm.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens,
                                   eos_token_id=None, pad_token_id=pad_id)
    width = inputs["input_ids"].shape[1]
    new_ids = output[:, width:]
    tm.tokenizer.batch_decode(new_ids.tolist(), skip_special_tokens=True)
    wall = time.perf_counter() - started
    if new_ids.shape[1] != max_new_tokens:
        raise RuntimeError(
            f"padded generate made {new_ids.shape[1]} tokens per row, expected {max_new_tokens}:"
            " the runs would not be comparable")
    return PaddedRun(
        prompts=len(prompts), prompt_tokens=inputs["attention_mask"].sum(dim=1).tolist(),
        padded_width=width, completion_tokens=int(new_ids.numel()), wall_s=wall,
    )


def _pad_id(tm: TutorialModel) -> int:
    """The tokenizer's pad token; else the end-of-text token, as generate itself falls back."""
    if tm.tokenizer.pad_token_id is None:
        tm.tokenizer.pad_token = tm.tokenizer.eos_token
    return int(tm.tokenizer.pad_token_id)
