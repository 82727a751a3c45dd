"""The limit: what the device can compute, and so how many tokens per second the model allows."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

FLOPS_FORMULA = (
    "FLOPs per generated token = 2 x (parameters used in matmuls per token) = 2 x (non-embedding "
    "parameters + LM head parameters); the embedding lookup is free and a tied LM head is counted "
    "once. Attention score/value FLOPs (which grow with context) are not counted."
)


@dataclass(frozen=True)
class MatmulPeak:
    flops_per_s: float
    best_size: int
    sizes: list[int]
    repeats: int
    dtype: str
    device: str


@dataclass(frozen=True)
class ModelCost:
    parameters: int
    embedding_parameters: int
    lm_head_parameters: int
    lm_head_tied: bool
    matmul_parameters: int
    flops_per_token: float
    formula: str = FLOPS_FORMULA


def matmul_sizes(device: torch.device, quick: bool) -> list[int]:
    # Large enough that the kernel, not the call, dominates; a GPU needs far larger to saturate.
    if device.type == "cuda":
        return [4096, 8192] if quick else [4096, 8192, 16384]
    return [512, 1024] if quick else [512, 1024, 2048, 4096]


def measure_matmul_peak(
    device: torch.device, dtype: torch.dtype, sizes: list[int], repeats: int = 5,
    slow_s: float = 1.0,
) -> MatmulPeak:
    """Best FLOP/s of square matmuls C = A @ B (2 n^3 FLOPs each), after one warm-up per size.

    Sizes grow until one matmul takes over `slow_s`: a dtype without a fast kernel on this
    device (bf16 on a CPU without AVX-512/AMX runs at ~1 GFLOP/s) would otherwise take many
    minutes at the largest size, and shows its rate at any size.
    """
    best, best_size, measured = 0.0, sizes[0], []
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        warm_up_s = _timed_matmul(a, b)  # kernel selection, allocator, caches
        slow = warm_up_s > slow_s
        seconds = min(_timed_matmul(a, b) for _ in range(1 if slow else repeats))
        measured.append(n)
        if 2 * n**3 / seconds > best:
            best, best_size = 2 * n**3 / seconds, n
        if slow:
            break
    return MatmulPeak(best, best_size, measured, repeats, str(dtype).removeprefix("torch."),
                      str(device))


def _timed_matmul(a: torch.Tensor, b: torch.Tensor) -> float:
    _synchronize(a.device)
    started = time.perf_counter()
    torch.matmul(a, b)
    _synchronize(a.device)
    return time.perf_counter() - started


def _synchronize(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without this the timer measures only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_cost(model: Any) -> ModelCost:
    """Parameters that take part in a matmul for every token, from the loaded model itself."""
    total = sum(p.numel() for p in model.parameters())  # shared (tied) tensors counted once
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = embedding.data_ptr() == head.data_ptr()
    # Tied: the one shared matrix is the LM head's matmul. Untied: the input table is a lookup.
    matmul_params = total if tied else total - embedding.numel()
    return ModelCost(
        parameters=total, embedding_parameters=embedding.numel(),
        lm_head_parameters=head.numel(), lm_head_tied=tied, matmul_parameters=matmul_params,
        flops_per_token=2.0 * matmul_params,
    )


def limit_summary(
    peak: MatmulPeak, cost: ModelCost, float32_peak: MatmulPeak | None = None
) -> dict[str, Any]:
    summary = {
        "matmul": asdict(peak),
        "model": asdict(cost),
        "compute_bound_tokens_per_s": peak.flops_per_s / cost.flops_per_token,
    }
    if float32_peak is not None:
        # For reference only: whether the model's dtype is the fast one on this device.
        summary["float32_matmul_flops_per_s"] = float32_peak.flops_per_s
    return summary


def mfu(tokens_per_s: float, limit: dict[str, Any]) -> float:
    """Model-FLOPs utilisation: the share of the matmul peak that the generated tokens used."""
    return tokens_per_s / limit["compute_bound_tokens_per_s"]
