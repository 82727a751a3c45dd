"""Choosing the next token: the job's parameters over the model's defaults, greedy or sampled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from producer.schemas import GenerationParams


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


def resolve_sampling(params: GenerationParams, model_defaults: Any) -> SamplingParams:
    """A field the job leaves unset takes the model's generation_config value, then HF's default."""

    def pick(name: str, fallback: Any) -> Any:
        value = getattr(params, name)
        if value is None:
            value = getattr(model_defaults, name, None)
        return fallback if value is None else value

    return SamplingParams(
        do_sample=bool(pick("do_sample", False)),
        temperature=float(pick("temperature", 1.0)),
        top_p=float(pick("top_p", 1.0)),
        top_k=int(pick("top_k", 0)),
        seed=params.seed,
    )


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One token from one row's logits with temperature, top-k and top-p (nucleus) filtering."""
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the best one always stays.
        outside = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(outside, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
