"""Which batcher is faster on this device: chatqueue's engine or transformers' continuous batching?

    .venv/bin/python -m benchmarks.backends [--quick] [--model-dir DIR] [--jobs 32]

One process, one loaded model (as the worker loads it), the benchmark's fixed prompts cycled
to N jobs, greedy with EOS ignored so both generate the same number of tokens. Each backend
gets one warm-up call, then the rounds alternate (engine, transformers, engine, ...) so that
both sides share whatever else the machine is doing. No Redis, no Celery: this compares the
batchers alone; `benchmarks.run` measures the product end to end.

- engine: `worker.engine.Engine`, all N jobs submitted at once (what N task slots do).
- transformers-cb: `model.generate_batch` (transformers' continuous batching, paged cache).

Writes <out>/<model>-backends.json and prints tokens/s per backend and their ratio. Also
reports how many jobs produced the same tokens on both sides (in float32 greedy they should
all agree; a difference means a numerics or a bug worth a look, not a faster backend).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from benchmarks.gpu import cache_sized_to_work
from benchmarks.prompts import prompt_for
from benchmarks.run import ENABLE_THINKING, REPO_ROOT, machine_info, prepare_model_dir
from producer.schemas import ChatRequest
from worker.engine import Engine, EngineLimits, EngineRequest
from worker.manifest import read_manifest
from worker.model import LoadedModel, load_model, resolve_device
from worker.pipeline.sampling import SamplingParams
from worker.service import build_prompt_ids

BACKENDS = ("engine", "transformers-cb")


def in_process_parser(description: str) -> argparse.ArgumentParser:
    """The options of the in-process engine benchmarks (this one and benchmarks.engine_ab)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true",
                        help="the tiny test model, 8 jobs of 8 tokens, one round: checks the "
                             "script works, measures nothing")
    parser.add_argument("--model-dir", type=Path, help="default: the demo model's folder")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="auto", help="as CHATQUEUE_DEVICE (default auto)")
    parser.add_argument("--dtype", default="auto", help="as CHATQUEUE_DTYPE (default auto)")
    parser.add_argument("--jobs", type=int, help="concurrent jobs per round (default 32)")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per job (default 64)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 2)")
    return parser


@dataclass
class Workload:
    """The model loaded as the worker loads it and the benchmark's prompts cycled to N jobs."""

    args: argparse.Namespace
    model_dir: Path
    loaded: LoadedModel
    jobs: int
    new_tokens: int
    rounds: int
    prompts: list[list[int]]
    started: float = field(default_factory=time.time)
    load_average_start: list[float] = field(default_factory=lambda: list(os.getloadavg()))

    @classmethod
    def load(cls, args: argparse.Namespace) -> Workload:
        jobs = args.jobs or (8 if args.quick else 32)
        model_dir = prepare_model_dir(args)
        started, load_average_start = time.time(), list(os.getloadavg())
        loaded = load_model(model_dir, read_manifest(model_dir),
                            device=resolve_device(args.device), dtype=args.dtype)
        return cls(args, model_dir, loaded, jobs,
                   new_tokens=args.max_new_tokens or (8 if args.quick else 64),
                   rounds=args.rounds or (1 if args.quick else 2),
                   prompts=[_prompt_ids(loaded, i) for i in range(jobs)],
                   started=started, load_average_start=load_average_start)

    def write(self, results: dict[str, Any], suffix: str) -> Path:
        """Adds the machine to `results` and writes <out>/<model>-<suffix>.json."""
        results["machine"] = machine_info(
            self.loaded.device, self.loaded.dtype, datetime.fromtimestamp(self.started, UTC),
            self.load_average_start)
        self.args.out.mkdir(parents=True, exist_ok=True)
        path = Path(self.args.out) / f"{results['model_id'].rsplit('/', 1)[-1]}-{suffix}.json"
        path.write_text(json.dumps(results, indent=2) + "\n")
        return path


def main(argv: list[str] | None = None) -> int:
    work = Workload.load(in_process_parser(__doc__.split("\n\n")[0]).parse_args(argv))
    loaded, jobs, new_tokens, prompts = work.loaded, work.jobs, work.new_tokens, work.prompts
    runners = {"engine": EngineRunner(loaded, jobs), "transformers-cb": BatchRunner(loaded)}
    try:
        outputs = {name: runner.run(prompts[:2], 2) for name, runner in runners.items()}  # warm
        seconds: dict[str, list[float]] = {name: [] for name in BACKENDS}
        for _ in range(work.rounds):
            for name, runner in runners.items():
                began = time.perf_counter()
                outputs[name] = runner.run(prompts, new_tokens)
                seconds[name].append(time.perf_counter() - began)
                _check_lengths(name, outputs[name], new_tokens)
    finally:
        runners["engine"].close()
    results = _summarise(loaded, work.model_dir, jobs, new_tokens, prompts, seconds, outputs)
    _report(results, work.write(results, "backends"))
    return 0


class EngineRunner:
    def __init__(self, loaded: LoadedModel, jobs: int) -> None:
        self.engine = Engine(loaded.model, pad_id=loaded.pad_id, think=loaded.think,
                             limits=EngineLimits(max_batch_size=jobs)).start()

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        greedy = SamplingParams(do_sample=False)
        jobs = [self.engine.submit(EngineRequest(p, new_tokens, greedy, frozenset()))
                for p in prompts]
        return [job.future.result().token_ids for job in jobs]

    def close(self) -> None:
        self.engine.stop()


class BatchRunner:
    def __init__(self, loaded: LoadedModel) -> None:
        self.model = loaded.model
        self.pad_id = loaded.pad_id

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=self.pad_id)
        with torch.inference_mode():
            outputs = self.model.generate_batch(prompts, generation_config=config,
                                                progress_bar=False,
                                                **cache_sized_to_work(self.model, prompts,
                                                                      new_tokens))
        # Results are keyed by request id in submission order ("req_0", "req_1", ...).
        ordered = sorted(outputs.values(), key=lambda o: int(o.request_id.rsplit("_", 1)[-1]))
        return [list(o.generated_tokens) for o in ordered]


def _prompt_ids(loaded: LoadedModel, index: int) -> list[int]:
    return build_prompt_ids(loaded, ChatRequest.model_validate({
        "messages": prompt_for(index), "params": {"enable_thinking": ENABLE_THINKING}}))


def _check_lengths(name: str, outputs: list[list[int]], new_tokens: int) -> None:
    lengths = {len(tokens) for tokens in outputs}
    if lengths != {new_tokens}:
        raise RuntimeError(f"{name} generated {sorted(lengths)} tokens per job, expected "
                           f"{new_tokens}: the backends would not be compared on equal work")


def _summarise(loaded: LoadedModel, model_dir: Path, jobs: int, new_tokens: int,
               prompts: list[list[int]], seconds: dict[str, list[float]],
               outputs: dict[str, list[list[int]]]) -> dict[str, Any]:
    tokens = jobs * new_tokens
    rows = {
        name: {"seconds": times, "tokens_per_s": tokens / statistics.median(times)}
        for name, times in seconds.items()
    }
    same = sum(a == b for a, b in zip(outputs["engine"], outputs["transformers-cb"], strict=True))
    return {
        "model_id": read_manifest(model_dir).repo_id,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "jobs": jobs,
        "max_new_tokens": new_tokens,
        "prompt_tokens": [len(p) for p in prompts],
        "backends": rows,
        "engine_over_transformers_cb": (rows["engine"]["tokens_per_s"]
                                        / rows["transformers-cb"]["tokens_per_s"]),
        "jobs_with_identical_tokens": same,
    }


def _report(results: dict[str, Any], path: Path) -> None:
    print(f"{results['model_id']} ({results['dtype']} on {results['device']}), "
          f"{results['jobs']} jobs x {results['max_new_tokens']} new tokens, greedy, EOS ignored")
    for name, row in results["backends"].items():
        rounds = ", ".join(f"{s:.1f}" for s in row["seconds"])
        print(f"  {name:16s} {row['tokens_per_s']:8.1f} tok/s   (rounds: {rounds} s)")
    print(f"  engine / transformers-cb = {results['engine_over_transformers_cb']:.2f}x; "
          f"identical tokens in {results['jobs_with_identical_tokens']}/{results['jobs']} jobs")
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
