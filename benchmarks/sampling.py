"""Choosing tokens for a batch: the old row-by-row sampler against `sample_batch`.

    .venv/bin/python -m benchmarks.sampling [--rows 32] [--device cpu] [--dtype float32]

Times one decode step's token choice for `--rows` rows with Qwen3's default sampling
(temperature 0.6, top_k 20, top_p 0.95) at a SmolLM2-sized (49,152) and a Qwen-sized (151,936)
vocabulary, prints ms per step and the speed-up, and writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks.run import cpu_model
from worker.pipeline.sampling import SamplingParams, sample_batch, sample_token

QWEN3_DEFAULTS = SamplingParams(do_sample=True, temperature=0.6, top_p=0.95, top_k=20)
VOCABULARIES = {"smollm2": 49_152, "qwen3": 151_936}


def legacy_sample_token(logits: torch.Tensor, params: SamplingParams,
                        generator: torch.Generator) -> int:
    """The engine's sampler before sample_batch: top-p sorts the whole vocabulary."""
    scores = logits.float() / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth_best = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        outside = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(outside, float("-inf")))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def time_step(step: Callable[[], object], device: torch.device, repeats: int) -> dict[str, float]:
    step()  # warm-up
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        step()  # every sampler ends in .tolist() / .item(): the step is finished on return
        samples.append((time.perf_counter() - started) * 1e3)
    return {"median_ms": statistics.median(samples), "min_ms": min(samples),
            "repeats": repeats}


def measure(rows: int, vocab: int, device: torch.device, dtype: torch.dtype,
            repeats: int) -> dict[str, Any]:
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    params = [QWEN3_DEFAULTS] * rows
    generators = [torch.Generator(device=device).manual_seed(i) for i in range(rows)]

    results = {
        "legacy_row_by_row": time_step(
            lambda: [legacy_sample_token(logits[i], params[i], generators[i])
                     for i in range(rows)], device, max(3, repeats // 5)),
        "sample_token_row_by_row": time_step(
            lambda: [sample_token(logits[i], params[i], generators[i]) for i in range(rows)],
            device, repeats),
        "sample_batch": time_step(lambda: sample_batch(logits, params, generators), device,
                                  repeats),
        "greedy_argmax": time_step(lambda: logits.argmax(dim=-1).tolist(), device, repeats),
    }
    legacy = results["legacy_row_by_row"]["median_ms"]
    batched = results["sample_batch"]["median_ms"]
    return {"rows": rows, "vocab": vocab, "timings": results,
            "legacy_ms_per_row": legacy / rows,
            "speedup_batch_over_legacy": legacy / batched}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    load_start = list(os.getloadavg())
    started = datetime.now(UTC)
    runs = {}
    for name, vocab in VOCABULARIES.items():
        run = measure(args.rows, vocab, device, dtype, args.repeats)
        runs[name] = run
        t = run["timings"]
        print(f"{name:8} vocab {vocab:>7,} x {args.rows} rows: "
              f"legacy row-by-row {t['legacy_row_by_row']['median_ms']:8.2f} ms/step "
              f"({run['legacy_ms_per_row']:.2f} ms/row), "
              f"sample_token row-by-row {t['sample_token_row_by_row']['median_ms']:7.2f}, "
              f"sample_batch {t['sample_batch']['median_ms']:6.2f} ms/step "
              f"(x{run['speedup_batch_over_legacy']:.1f}), "
              f"greedy argmax {t['greedy_argmax']['median_ms']:5.2f}")

    report = {
        "sampling": {"temperature": QWEN3_DEFAULTS.temperature, "top_k": QWEN3_DEFAULTS.top_k,
                     "top_p": QWEN3_DEFAULTS.top_p},
        "logits_dtype": args.dtype,
        "runs": runs,
        "machine": {
            "cpu_model": cpu_model(),
            "processor": platform.processor(),
            "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(device),
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else None),
            "date": started.isoformat(timespec="seconds"),
            # A shared machine skews every number: keep the evidence with them.
            "load_average_start": load_start,
            "load_average_end": list(os.getloadavg()),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
