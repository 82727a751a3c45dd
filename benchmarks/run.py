"""Measure the product against its limit and against the tutorial's baseline, in one run.

    .venv/bin/python -m benchmarks.run [--quick] [--model-dir DIR] [--out benchmarks/results]

1. limit: the device's matmul peak in the model's dtype, and from it the compute-bound tokens/s
2. baseline: the tutorial's pipeline in this process, one request at a time
3. product: redis-server + a `chatqueue-worker run` process + ChatQueueClient. First each
   baseline request alone through the product, alternating with the baseline (request i in
   the tutorial, then the same request as a job): on a shared machine both sides of a pair see
   the same load. Then, with the tutorial's model freed, N concurrent jobs for each N.
4. results: <out>/<model>-<mode>.json and .png, and a table on stdout

Default: the demo model (SmolLM2-135M-Instruct, built if absent). --quick: the tiny test model
and fewer, shorter jobs, to check that the benchmark works, not to measure anything.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from benchmarks import baseline, limit, product, report
from benchmarks.prompts import PROMPTS, prompt_for
from producer import ChatQueueClient
from worker.manifest import read_manifest
from worker.model import resolve_device
from worker.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO_ROOT / ".cache" / "models" / "tiny-qwen3"
RESULT_TIMEOUT_S = 900.0
# GenerationParams' default; with it the Qwen3 template opens no empty think block.
ENABLE_THINKING = True


@dataclass(frozen=True)
class Mode:
    name: str
    levels: tuple[int, ...]
    max_new_tokens: int


QUICK = Mode("quick", levels=(1, 4, 8), max_new_tokens=16)
FULL = Mode("full", levels=(1, 4, 8, 16, 32, 64), max_new_tokens=64)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny test model, N in 1,4,8, 16 new tokens: under a minute")
    parser.add_argument("--model-dir", type=Path,
                        help="a model folder with a chatqueue manifest (default: the demo model, "
                             "or the tiny model with --quick; those two are built if absent)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results")
    parser.add_argument("--device", default="auto", help="as CHATQUEUE_DEVICE (default auto)")
    parser.add_argument("--dtype", default="auto", help="as CHATQUEUE_DTYPE (default auto: the "
                        "checkpoint's)")
    parser.add_argument("--levels", type=_int_list, help="concurrency levels, e.g. 1,4,16")
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per job")
    parser.add_argument("--worker-concurrency", type=int,
                        help="worker task slots (default: the largest level)")
    parser.add_argument("--max-batch-size", type=int,
                        help="engine batch size (default: the largest level)")
    parser.add_argument("--torch-threads", type=int,
                        help="CPU threads for both the baseline and the worker (default: torch's, "
                             "one per core)")
    return parser.parse_args(argv)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def choose_mode(args: argparse.Namespace) -> Mode:
    mode = QUICK if args.quick else FULL
    if args.levels:
        mode = replace(mode, levels=args.levels)
    if args.max_new_tokens:
        mode = replace(mode, max_new_tokens=args.max_new_tokens)
    return mode


def prepare_model_dir(args: argparse.Namespace) -> Path:
    """The folder to benchmark; the two models this project builds are built when missing."""
    from worker import devmodels

    if args.model_dir is not None:
        if not args.model_dir.is_dir():
            raise SystemExit(f"--model-dir {args.model_dir} does not exist")
        return args.model_dir.resolve()
    if args.quick:
        devmodels.build_tiny_qwen(TINY_MODEL_DIR)
        return TINY_MODEL_DIR
    # The worker's own default folder (defaults only: a .env must not redirect the benchmark).
    demo_dir = REPO_ROOT / WorkerSettings.model_construct().resolved_model_dir
    devmodels.build_demo_model(demo_dir)
    return demo_dir


def worker_config(
    args: argparse.Namespace, mode: Mode, device: torch.device, dtype: torch.dtype
) -> product.WorkerConfig:
    # Enough task slots and batch rows for the largest N to be one batch, unless told otherwise.
    largest = max(mode.levels)
    default_cap = WorkerSettings.model_construct().max_new_tokens_cap
    return product.WorkerConfig(
        # The dtype the baseline resolved, named: `auto` is decided per process (on a CPU by
        # timing a matmul), and both sides must run the same one.
        device=str(device), dtype=_dtype_name(dtype),
        concurrency=args.worker_concurrency or largest,
        max_batch_size=args.max_batch_size or largest,
        # The worker's default cap unless the jobs need more (its default_max_new_tokens must
        # stay under the cap, so the cap is never lowered).
        max_new_tokens_cap=max(mode.max_new_tokens, default_cap),
        # Always named: the worker's own default (CHATQUEUE_TORCH_THREADS as the tests set it)
        # may differ from this process's, and both sides must use the same number of threads.
        torch_threads=args.torch_threads or torch.get_num_threads(),
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def machine_info(
    device: torch.device, dtype: torch.dtype, started: datetime, load_average_start: list[float]
) -> dict[str, Any]:
    import celery
    import transformers

    return {
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "celery": celery.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "dtype": _dtype_name(dtype),
        "date": started.isoformat(timespec="seconds"),
        # Other work on the machine skews every number: keep the evidence with them.
        "load_average_start": load_average_start,
        "load_average_end": list(os.getloadavg()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def progress(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def warn_if_slow_dtype(peak: limit.MatmulPeak, float32_peak: limit.MatmulPeak) -> None:
    # bf16/fp16 on a CPU without AVX-512/AMX take a slow reference path: everything after this
    # would measure that path, not the product.
    if peak.flops_per_s < float32_peak.flops_per_s / 2:
        progress(
            f"WARNING: {peak.dtype} matmuls run at {peak.flops_per_s / 1e9:.1f} GFLOP/s here, "
            f"float32 at {float32_peak.flops_per_s / 1e9:.1f}: this CPU has no fast "
            f"{peak.dtype} kernels; consider --dtype float32"
        )


def measure_limit(tutorial: baseline.TutorialModel, device: torch.device,
                  quick: bool) -> dict[str, Any]:
    """Step 1, with the baseline's model: its dtype and its parameter count."""
    dtype = tutorial.model.dtype
    progress(f"matmul peak in {dtype} on {device}")
    sizes = limit.matmul_sizes(device, quick)
    peak = limit.measure_matmul_peak(device, dtype, sizes)
    float32_peak = None
    if device.type == "cpu" and dtype != torch.float32:
        float32_peak = limit.measure_matmul_peak(device, torch.float32, sizes)
        warn_if_slow_dtype(peak, float32_peak)
    return limit.limit_summary(peak, limit.model_cost(tutorial.model), float32_peak)


def measure_single_jobs(
    tutorial: baseline.TutorialModel, client: ChatQueueClient, mode: Mode
) -> tuple[list[baseline.RequestRun], list[product.JobRun]]:
    """Steps 2 and 3a, interleaved: each prompt in the tutorial, then alone through the product.

    Run one after the other, minutes apart, the two sides would each catch whatever else the
    machine was doing at the time; alternating, each pair shares it.
    """
    options = {"max_new_tokens": mode.max_new_tokens, "enable_thinking": ENABLE_THINKING}
    baseline.warm_up(tutorial, list(PROMPTS[0]), ENABLE_THINKING)
    product.warm_up(client, list(PROMPTS[0]), ENABLE_THINKING)
    progress(f"baseline and single jobs: {len(PROMPTS)} requests, alternating")
    baseline_runs, single = [], []
    for index, messages in enumerate(PROMPTS):
        baseline_runs.append(baseline.run_request(tutorial, index, list(messages), **options))
        (job,) = product.run_level(client, [list(messages)], **options).jobs
        single.append(replace(job, prompt_index=index))
    return baseline_runs, single


def measure_levels(client: ChatQueueClient, mode: Mode) -> dict[int, product.LevelRun]:
    """Step 3b: N jobs at once for each N, on the same worker, as a deployment would keep it."""
    levels = {}
    for n in mode.levels:
        progress(f"product: N={n} concurrent jobs")
        levels[n] = product.run_level(
            client, [prompt_for(i) for i in range(n)], max_new_tokens=mode.max_new_tokens,
            enable_thinking=ENABLE_THINKING,
        )
    return levels


def release_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_results(
    args: argparse.Namespace, mode: Mode, model_dir: Path, machine: dict[str, Any],
    config: product.WorkerConfig, limits: dict[str, Any], baseline_runs: list[baseline.RequestRun],
    single: list[product.JobRun], levels: dict[int, product.LevelRun], log_dir: Path,
) -> dict[str, Any]:
    manifest = read_manifest(model_dir)
    return {
        "mode": mode.name,
        "machine": machine,
        "config": {
            "model_name": manifest.repo_id.rsplit("/", 1)[-1], "model_id": manifest.repo_id,
            "model_revision": manifest.commit, "model_dir": str(model_dir),
            "device": machine["device"], "dtype": machine["dtype"], "dtype_setting": args.dtype,
            "max_new_tokens": mode.max_new_tokens, "greedy": True, "ignore_eos": True,
            "enable_thinking": ENABLE_THINKING, "concurrency_levels": list(mode.levels),
            "prompt_tokens": [r.prompt_tokens for r in baseline_runs],
            "torch_threads": args.torch_threads or torch.get_num_threads(),
            "worker": asdict(config), "worker_log_dir": str(log_dir),
        },
        "limit": limits,
        "baseline": report.summarise_baseline(baseline_runs, limits),
        "single_job": report.summarise_single_jobs(single, baseline_runs),
        "concurrency": [
            report.summarise_level(n, run, baseline_runs, limits)
            for n, run in levels.items()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = choose_mode(args)
    device = resolve_device(args.device)
    model_dir = prepare_model_dir(args)
    started, load_average_start = datetime.now(UTC), list(os.getloadavg())
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    tutorial = baseline.load_tutorial_model(model_dir, device, args.dtype)
    dtype = tutorial.model.dtype
    limits = measure_limit(tutorial, device, args.quick)
    config = worker_config(args, mode, device, dtype)
    log_dir = Path(tempfile.mkdtemp(prefix="chatqueue-bench-"))
    progress(f"product: starting redis-server and a worker ({config}); logs in {log_dir}")
    with product.running_product(model_dir, config, log_dir, RESULT_TIMEOUT_S) as client:
        baseline_runs, single = measure_single_jobs(tutorial, client, mode)
        del tutorial  # the sweep is the worker's alone: no second model holding memory
        release_device_memory(device)
        levels = measure_levels(client, mode)
    machine = machine_info(device, dtype, started, load_average_start)

    results = build_results(args, mode, model_dir, machine, config, limits, baseline_runs,
                            single, levels, log_dir)
    stem = f"{results['config']['model_name']}-{mode.name}"
    json_path, chart_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    report.write_json(results, json_path)
    report.write_chart(results, chart_path)
    print(report.format_table(results))
    print(f"\nresults: {json_path}\nchart:   {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
