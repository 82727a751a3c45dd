"""The engine on a GPU, in one go: throughput against transformers, and a float32 equality check.

    python -m benchmarks.gpu [--device cuda:0] [--dtype auto] [--config FILE] [--quick]

Made for a GPU machine lent for minutes, without Redis, Celery or a model hub: it builds a
randomly initialised model from a config kept in the repository (default
benchmarks/configs/qwen3-0.6b.json: Qwen3-0.6B's architecture), so nothing is downloaded; with
random weights and EOS ignored every job generates exactly --max-new-tokens tokens, which is
all a throughput measurement needs. Within about 8 minutes (--budget-s) it runs, in this order:

1. equality: a tiny model (benchmarks/configs/qwen3-tiny.json) in float32 on the device;
   prompts of varied lengths, two of them sharing a long prefix, all submitted to the engine
   at once with a small per-step token budget (chunked prefill), each job's greedy tokens
   compared with transformers' `generate` of that prompt alone.
2. engine: `worker.engine.Engine`, all N jobs submitted at once, for N in 1, 32, 128, 256.
3. hf-padded: one left-padded `model.generate` over the same N prompts (N > 1).
4. hf-batch1: `model.generate` one prompt at a time (the tutorial's loop), over a few prompts.
5. generate-batch: transformers' continuous batching, `model.generate_batch`, same N prompts.

Prompts are token ids drawn with a fixed seed (random weights: any ids will do), of lengths
between 16 and 512 tokens. A step that fails is recorded with its error and the rest still
runs; a step that would start after the budget is recorded as skipped. Prints a table and
writes <out>/gpu-<device name>.json (default out: benchmarks/results).

What the GPU machine needs: torch and transformers (it has them), and what `worker.engine`
imports: `worker.pipeline.sampling` -> `producer.schemas` -> pydantic (v2, with
pydantic-core, annotated-types, typing-inspection, typing-extensions). The `producer` package's
own `__init__` imports its Celery/Redis client; this script loads `producer.schemas` without
it, so celery, kombu, redis-py and pydantic-settings are NOT needed. If pydantic is missing
there, carry it with the working tree, e.g. built here for the GPU host's Python 3.12:

    .venv/bin/pip install --target gpu-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 --no-deps pydantic pydantic-core annotated-types \\
        typing-inspection typing-extensions
    # then on the GPU machine: PYTHONPATH=gpu-deps python -m benchmarks.gpu

(11 MB installed). The script checks this first and names what is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import re
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "benchmarks" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "qwen3-0.6b.json"
TINY_CONFIG = CONFIG_DIR / "qwen3-tiny.json"
# Imported only by `producer/__init__` (its Redis/Celery client), never by the engine's path.
PRODUCER_CLIENT_ONLY = ("celery", "kombu", "redis", "pydantic_settings")
ENGINE_NEEDS = ("torch", "transformers", "pydantic")


def check_imports() -> None:
    """Fail at once, naming what is missing, rather than minutes into a lent machine's time."""
    missing = [name for name in ENGINE_NEEDS if not _importable(name)]
    if missing:
        raise SystemExit(
            f"benchmarks.gpu: missing Python packages: {', '.join(missing)}. It needs torch, "
            "transformers, and pydantic v2 (worker.engine -> worker.pipeline.sampling -> "
            "producer.schemas); see `python -m benchmarks.gpu --help` (module docstring) for "
            "how to carry pydantic's wheels with the working tree.")
    if not all(_importable(name) for name in PRODUCER_CLIENT_ONLY):
        _bare_producer_package()


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _bare_producer_package() -> None:
    """Register `producer` as a package without running its `__init__` (which imports the
    Celery client): `import producer.schemas` then loads that module alone."""
    if "producer" in sys.modules:
        return
    package = types.ModuleType("producer")
    package.__path__ = [str(REPO_ROOT / "producer")]
    package.__package__ = "producer"
    sys.modules["producer"] = package


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="default: cuda:0 when CUDA is "
                        "available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16",
                                                            "float32"),
                        help="the model's dtype (auto: the config's on CUDA, float32 on a CPU)")
    parser.add_argument("--config", type=Path, help="model config JSON (default: Qwen3-0.6B's "
                        "architecture; the tiny config with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny config, small counts: checks the script on a CPU in a minute "
                             "or two, measures nothing")
    parser.add_argument("--levels", type=_int_list, help="concurrent jobs (default 1,32,128,256; "
                        "1,4,8 with --quick)")
    parser.add_argument("--max-new-tokens", type=int, help="per job (default 128; 16 --quick)")
    parser.add_argument("--max-step-tokens", type=int,
                        help="the engine's per-step token budget (default: 8192 on CUDA, the "
                             "engine's own default elsewhere)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="steps that would start later than this are skipped (default 450)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # No hub on a lent machine: anything that would fetch (a kernel, a config) fails fast.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_imports()
    import torch

    started = time.perf_counter()
    device = _device(args.device)
    dtype = _dtype(args.dtype, device, args.config or (TINY_CONFIG if args.quick else
                                                       DEFAULT_CONFIG))
    levels = args.levels or ((1, 4, 8) if args.quick else (1, 32, 128, 256))
    new_tokens = args.max_new_tokens or (16 if args.quick else 128)
    results: dict[str, Any] = {
        "what": "chatqueue's engine on one device against transformers, random weights, EOS "
                "ignored, greedy; tokens/s = all jobs' new tokens / wall time",
        "mode": "quick" if args.quick else "full",
        "machine": machine_info(device),
    }
    name = _slug(results["machine"]["device_name"] or device.type)
    path = args.out / f"gpu-{name}{'-quick' if args.quick else ''}.json"
    # Written after every step: a run cut short by the machine's time limit keeps what it had.
    bench = Bench(started=started, budget_s=args.budget_s, results=results, path=path)

    progress(f"equality check: tiny model, float32 on {device}")
    results["equality_check"] = bench.step(
        "equality_check", lambda: equality_check(device, quick=args.quick, seed=args.seed))

    config_path = args.config or (TINY_CONFIG if args.quick else DEFAULT_CONFIG)
    progress(f"building {config_path.name} with random weights in {dtype} on {device}")
    torch.manual_seed(args.seed)
    model = build_model(config_path, device, dtype)
    prompts = random_prompts(max(levels), model.config.vocab_size, seed=args.seed,
                             low=8 if args.quick else 16, high=64 if args.quick else 512)
    limits = bench.step("engine_limits", lambda: engine_limits(
        max(levels), prompts, new_tokens, device, args.max_step_tokens)) or {}
    results["config"] = {
        "model_config": str(config_path.relative_to(REPO_ROOT)
                            if config_path.is_relative_to(REPO_ROOT) else config_path),
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "levels": list(levels), "max_new_tokens": new_tokens,
        "prompt_tokens": {"min": min(map(len, prompts)), "max": max(map(len, prompts)),
                          "mean": statistics.fmean(map(len, prompts))},
        "engine_limits": limits, "budget_s": args.budget_s,
    }
    results["limit"] = bench.step("limit", lambda: measure_limit(model, device, args.quick))

    results["engine"] = bench.step(
        "engine", lambda: engine_levels(model, prompts, levels, new_tokens, limits, bench))
    _release(device)
    many = [n for n in levels if n > 1]
    results["hf_padded"] = [
        bench.step(f"hf_padded_{n}", lambda n=n: hf_padded(model, prompts[:n], new_tokens))
        for n in many
    ]
    batch1_prompts = prompts[:2]
    results["hf_batch1"] = bench.step(
        "hf_batch1", lambda: hf_one_at_a_time(model, batch1_prompts, new_tokens))
    results["generate_batch"] = generate_batch_levels(model, prompts, many, new_tokens, bench)
    results["summary"] = summarise(results, levels)
    results["complete"] = True
    results.pop("partial", None)
    bench.save()
    print(format_table(results))
    print(f"\nresults: {path}")
    return 0


class Bench:
    """Runs the steps: each within the time budget, a failure recorded rather than fatal."""

    def __init__(self, started: float, budget_s: float, results: dict[str, Any],
                 path: Path) -> None:
        self.started, self.budget_s = started, budget_s
        self.results, self.path = results, path
        self.errors: dict[str, str] = {}
        self.skipped: list[str] = []
        results.update(complete=False, errors=self.errors, skipped=self.skipped)

    def save(self) -> None:
        self.results["elapsed_s"] = round(time.perf_counter() - self.started, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(self.path.name + ".tmp")
        staging.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(staging, self.path)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.started > self.budget_s

    def step(self, name: str, run: Callable[[], Any]) -> Any:
        if self.over_budget():
            progress(f"skipped {name}: past the {self.budget_s:.0f} s budget")
            self.skipped.append(name)
            return None
        try:
            value = run()
        except Exception as exc:  # one backend's failure must not lose the others' numbers
            progress(f"{name} failed: {type(exc).__name__}: {exc}")
            self.errors[name] = f"{type(exc).__name__}: {exc}"[:2000]
            value = None
        # Each step's result as it comes, for a run cut short; a finished run drops this.
        self.results.setdefault("partial", {})[name] = value
        self.save()
        return value


def progress(message: str) -> None:
    print(f"[gpu-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return device


def _dtype(name: str, device: Any, config_path: Path) -> Any:
    import torch

    if name == "auto":
        if device.type == "cpu":
            return torch.float32  # bf16 on a CPU without AMX/AVX512-BF16 takes a slow path
        name = json.loads(config_path.read_text()).get("torch_dtype") or "bfloat16"
    return getattr(torch, name)


def build_model(config_path: Path, device: Any, dtype: Any) -> Any:
    """Random weights (transformers' own initialisation), built directly on the device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = json.loads(config_path.read_text())
    fields.pop("architectures", None)
    fields.pop("torch_dtype", None)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Greedy and endless: no end-of-sequence token, so every row makes max_new_tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def random_prompts(count: int, vocab: int, *, seed: int, low: int, high: int) -> list[list[int]]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=generator).tolist()
    return [torch.randint(10, vocab, (n,), generator=generator).tolist() for n in lengths]


def engine_limits(jobs: int, prompts: Sequence[Sequence[int]], new_tokens: int, device: Any,
                  max_step_tokens: int | None, kv_cache_bytes: int | None = None
                  ) -> dict[str, Any]:
    """The EngineLimits to use, as a dict: only fields this engine version has."""
    from worker.engine import EngineLimits

    known = {f.name for f in dataclasses.fields(EngineLimits)}
    wanted: dict[str, Any] = {
        "max_batch_size": jobs,
        # Room for every job at once: the run measures batching, not admission control.
        "max_batch_tokens": sum(len(p) for p in prompts[:jobs]) + jobs * new_tokens + 1,
    }
    if max_step_tokens is not None or device.type == "cuda":
        wanted["max_step_tokens"] = max_step_tokens or 8192
    if kv_cache_bytes is not None:
        wanted["kv_cache_bytes"] = kv_cache_bytes
    elif device.type == "cuda":
        # Leave room for transformers' own runs in the same process once the engine is gone.
        wanted["kv_cache_memory_fraction"] = 0.5
    return {key: value for key, value in wanted.items() if key in known}


def run_engine(engine: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> dict[str, Any]:
    """All jobs submitted at once; wall time to the last result."""
    from worker.engine import EngineRequest
    from worker.pipeline.sampling import SamplingParams

    greedy = SamplingParams(do_sample=False)
    began = time.perf_counter()
    jobs = [engine.submit(EngineRequest(list(p), new_tokens, greedy, frozenset()))
            for p in prompts]
    outputs = [job.future.result() for job in jobs]
    wall = time.perf_counter() - began
    lengths = {len(out.token_ids) for out in outputs}
    if lengths != {new_tokens}:
        raise RuntimeError(f"engine jobs made {sorted(lengths)} tokens, expected {new_tokens}")
    first = [out.first_token_at - job.submitted_at for job, out in zip(jobs, outputs, strict=True)
             if out.first_token_at is not None]
    return {
        "jobs": len(prompts), "tokens_per_s": len(prompts) * new_tokens / wall, "wall_s": wall,
        "first_token_p50_s": statistics.median(first) if first else None,
        "first_token_max_s": max(first) if first else None,
        "token_ids": [out.token_ids for out in outputs],
    }


def start_engine(model: Any, limits: dict[str, Any]) -> Any:
    from worker.engine import Engine, EngineLimits

    return Engine(model, pad_id=0, limits=EngineLimits(**limits)).start()


def engine_levels(model: Any, prompts: list[list[int]], levels: Sequence[int], new_tokens: int,
                  limits: dict[str, Any], bench: Bench) -> list[dict[str, Any]]:
    engine = start_engine(model, limits)
    rows = []
    try:
        progress(f"engine warm-up: {max(levels)} jobs x 2 tokens")
        run_engine(engine, prompts[: max(levels)], 2)
        for n in levels:
            if bench.over_budget():
                bench.skipped.append(f"engine_{n}")
                continue
            progress(f"engine: {n} jobs x {new_tokens} new tokens")
            row = run_engine(engine, prompts[:n], new_tokens)
            row.pop("token_ids")
            rows.append(row)
    finally:
        engine.stop()
    return rows


def hf_generate(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> Any:
    """One left-padded greedy `generate` over the prompts; returns the new tokens [rows, new]."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt):] = torch.tensor(prompt)
        mask[i, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                             pad_token_id=0)
    new = out[:, width:].cpu()
    if new.shape[1] != new_tokens:
        raise RuntimeError(f"generate made {new.shape[1]} tokens, expected {new_tokens}")
    return new


def hf_padded(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> dict[str, Any]:
    progress(f"hf padded generate: {len(prompts)} prompts x {new_tokens} new tokens")
    hf_generate(model, prompts[:2], 2)  # warm-up (kernels, allocator) at this module's shapes
    began = time.perf_counter()
    hf_generate(model, prompts, new_tokens)
    wall = time.perf_counter() - began
    return {"jobs": len(prompts), "tokens_per_s": len(prompts) * new_tokens / wall,
            "wall_s": wall, "padded_width": max(len(p) for p in prompts)}


def hf_one_at_a_time(model: Any, prompts: Sequence[Sequence[int]],
                     new_tokens: int) -> dict[str, Any]:
    progress(f"hf generate one prompt at a time: {len(prompts)} prompts")
    hf_generate(model, prompts[:1], 2)
    began = time.perf_counter()
    for prompt in prompts:
        hf_generate(model, [prompt], new_tokens)
    wall = time.perf_counter() - began
    return {"jobs": len(prompts), "tokens_per_s": len(prompts) * new_tokens / wall,
            "wall_s": wall}


def run_generate_batch(model: Any, prompts: Sequence[Sequence[int]], new_tokens: int) -> float:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    began = time.perf_counter()
    with torch.inference_mode():
        outputs = model.generate_batch([list(p) for p in prompts], generation_config=config,
                                       progress_bar=False,
                                       **cache_sized_to_work(model, prompts, new_tokens))
    wall = time.perf_counter() - began
    lengths = {len(o.generated_tokens) for o in outputs.values()}
    if len(outputs) != len(prompts) or lengths != {new_tokens}:
        raise RuntimeError(f"generate_batch returned {len(outputs)} results of {sorted(lengths)} "
                           f"tokens, expected {len(prompts)} of {new_tokens}")
    return wall


def cache_sized_to_work(model: Any, prompts: Sequence[Sequence[int]],
                         new_tokens: int) -> dict[str, Any]:
    """On a CPU, a paged cache as large as the work: left to size itself from free memory it
    allocates gigabytes per call (measured here: 13 s against 0.7 s for 4 tiny jobs). On CUDA
    its own sizing (a share of free device memory) is what users get."""
    if model.device.type == "cuda":
        return {}
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:  # older transformers: its defaults, whatever they cost
        return {}
    page = ContinuousBatchingConfig().page_size
    blocks = sum(-(-(len(p) + new_tokens) // page) for p in prompts) + 4
    return {"continuous_batching_config": ContinuousBatchingConfig(num_blocks=blocks,
                                                                   max_batch_tokens=512)}


def generate_batch_levels(model: Any, prompts: list[list[int]], levels: Sequence[int],
                          new_tokens: int, bench: Bench) -> list[dict[str, Any]]:
    if not levels:
        return []

    def warm_up() -> None:
        progress("transformers generate_batch warm-up")
        run_generate_batch(model, prompts[:2], 2)

    bench.step("generate_batch_warm_up", warm_up)
    if "generate_batch_warm_up" in bench.errors:
        return []

    def level(n: int) -> dict[str, Any]:
        progress(f"transformers generate_batch: {n} prompts x {new_tokens} new tokens")
        wall = run_generate_batch(model, prompts[:n], new_tokens)
        return {"jobs": n, "tokens_per_s": n * new_tokens / wall, "wall_s": wall}

    rows = [bench.step(f"generate_batch_{n}", lambda n=n: level(n)) for n in levels]
    return [row for row in rows if row is not None]


def equality_check(device: Any, *, quick: bool, seed: int) -> dict[str, Any]:
    """float32, tiny model: the engine's greedy tokens for jobs batched together (chunked
    prefill, a shared prefix) equal transformers' `generate` of each prompt alone."""
    import torch

    torch.manual_seed(seed)
    model = build_model(TINY_CONFIG, device, torch.float32)
    prompts = random_prompts(8, model.config.vocab_size, seed=seed + 1, low=5, high=200)
    # One job starts with another's whole prompt: a prefix-cache hit where the engine has one.
    prompts.append(max(prompts, key=len) + prompts[0][:20])
    new_tokens = 16 if quick else 32
    limits = engine_limits(len(prompts), prompts, new_tokens, device, max_step_tokens=64,
                           kv_cache_bytes=64 << 20)  # not a share of the GPU for a tiny model
    engine = start_engine(model, limits)
    try:
        engine_tokens = run_engine(engine, prompts, new_tokens)["token_ids"]
    finally:
        engine.stop()
    reference = [hf_generate(model, [p], new_tokens)[0].tolist() for p in prompts]
    matching = [a == b for a, b in zip(engine_tokens, reference, strict=True)]
    return {
        "passed": all(matching), "jobs": len(prompts), "matching_jobs": sum(matching),
        "dtype": "float32", "device": str(device), "max_new_tokens": new_tokens,
        "engine_limits": limits, "prompt_tokens": [len(p) for p in prompts],
        "mismatches": [{"job": i, "engine": a, "generate": b}
                       for i, (a, b, same) in enumerate(zip(engine_tokens, reference, matching,
                                                            strict=True)) if not same],
    }


def measure_limit(model: Any, device: Any, quick: bool) -> dict[str, Any]:
    from benchmarks import limit

    sizes = [1024] if quick else ([4096, 8192] if device.type == "cuda" else [1024, 2048])
    peak = limit.measure_matmul_peak(device, model.dtype, sizes)
    return limit.limit_summary(peak, limit.model_cost(model))


def summarise(results: dict[str, Any], levels: Sequence[int]) -> dict[str, float | None]:
    def by_jobs(rows: list[dict[str, Any]] | None) -> dict[int, float]:
        return {row["jobs"]: row["tokens_per_s"] for row in rows or [] if row}

    engine, padded = by_jobs(results["engine"]), by_jobs(results["hf_padded"])
    batch = by_jobs(results["generate_batch"])
    one = (results["hf_batch1"] or {}).get("tokens_per_s")
    bound = (results["limit"] or {}).get("compute_bound_tokens_per_s")
    summary: dict[str, float | None] = {"hf_batch1_tok_s": one}
    for n in levels:
        summary[f"engine_tok_s_{n}"] = engine.get(n)
        if n > 1:
            summary[f"hf_padded_tok_s_{n}"] = padded.get(n)
            summary[f"generate_batch_tok_s_{n}"] = batch.get(n)
            summary[f"engine_over_padded_{n}"] = _ratio(engine.get(n), padded.get(n))
            summary[f"engine_over_generate_batch_{n}"] = _ratio(engine.get(n), batch.get(n))
        summary[f"engine_mfu_{n}"] = _ratio(engine.get(n), bound)
    check = results["equality_check"]
    summary["equality_check_passed"] = None if check is None else float(check["passed"])
    return summary


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_table(results: dict[str, Any]) -> str:
    config, summary = results.get("config", {}), results["summary"]
    machine = results["machine"]
    lines = [f"{machine['device_name'] or machine['device']}: {config.get('model_config')} "
             f"({config.get('dtype')}), random weights, {config.get('max_new_tokens')} new tokens "
             f"per job, prompts {config.get('prompt_tokens')}",
             f"{'jobs':>5} {'engine':>10} {'padded':>10} {'gen_batch':>10} {'x padded':>9} "
             f"{'x gen_b':>8}"]

    def cell(value: float | None, fmt: str = "10.1f") -> str:
        return f"{value:{fmt}}" if value is not None else f"{'-':>{fmt.split('.')[0]}}"

    for n in config.get("levels", []):
        lines.append(f"{n:>5} {cell(summary.get(f'engine_tok_s_{n}'))} "
                     f"{cell(summary.get(f'hf_padded_tok_s_{n}'))} "
                     f"{cell(summary.get(f'generate_batch_tok_s_{n}'))} "
                     f"{cell(summary.get(f'engine_over_padded_{n}'), '9.2f')} "
                     f"{cell(summary.get(f'engine_over_generate_batch_{n}'), '8.2f')}")
    lines.append(f"hf generate one prompt at a time: {cell(summary['hf_batch1_tok_s'], '.1f')} "
                 "tok/s")
    check = results["equality_check"]
    lines.append("equality check (float32, tiny model): " + (
        "not run" if check is None else
        f"{'PASSED' if check['passed'] else 'FAILED'} ({check['matching_jobs']}/{check['jobs']} "
        f"jobs equal transformers' generate)"))
    if results["errors"]:
        lines.append(f"errors: {results['errors']}")
    if results["skipped"]:
        lines.append(f"skipped (time budget): {results['skipped']}")
    lines.append(f"elapsed {results['elapsed_s']} s")
    return "\n".join(lines)


def machine_info(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    cuda = device.type == "cuda"
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "device_memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                              if cuda else None),
        "cuda": torch.version.cuda if cuda else None,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _release(device: Any) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


if __name__ == "__main__":
    raise SystemExit(main())
