"""Measure the product against its limit and against the tutorial's baseline, in one run.

    .venv/bin/python -m benchmarks.run [--quick] [--model-dir DIR] [--out benchmarks/results]

1. limit: the device's matmul peak in the model's dtype, and from it the compute-bound tokens/s
2. baseline: the tutorial's pipeline in this process, one request at a time
3. product: redis-server + a `chatqueue-worker run` process + ChatQueueClient; the baseline's
   requests one at a time (overhead), then N concurrent jobs for each N
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
FULL = Mode("full", levels=(1, 4, 8, 16, 32, 64), max_new_tokens=128)


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
    args: argparse.Namespace, mode: Mode, device: torch.device
) -> product.WorkerConfig:
    # Enough task slots and batch rows for the largest N to be one batch, unless told otherwise.
    largest = max(mode.levels)
    default_cap = WorkerSettings.model_construct().max_new_tokens_cap
    return product.WorkerConfig(
        device=str(device), dtype=args.dtype,
        concurrency=args.worker_concurrency or largest,
        max_batch_size=args.max_batch_size or largest,
        # The worker's default cap unless the jobs need more (its default_max_new_tokens must
        # stay under the cap, so the cap is never lowered).
        max_new_tokens_cap=max(mode.max_new_tokens, default_cap),
    )


def machine_info(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import celery
    import transformers

    info = {
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
        "dtype": str(dtype).removeprefix("torch."),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        # Other work on the machine skews every number: keep the evidence with them.
        "load_average_start": list(os.getloadavg()),
    }
    return info


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


def measure_limit_and_baseline(
    model_dir: Path, device: torch.device, args: argparse.Namespace, mode: Mode
) -> tuple[dict[str, Any], list[baseline.RequestRun], torch.dtype]:
    """Steps 1 and 2 share one loaded model; it is freed before the worker loads its own."""
    tutorial = baseline.load_tutorial_model(model_dir, device, args.dtype)
    dtype = tutorial.model.dtype
    progress(f"matmul peak in {dtype} on {device}")
    peak = limit.measure_matmul_peak(device, dtype, limit.matmul_sizes(device, args.quick))
    limits = limit.limit_summary(peak, limit.model_cost(tutorial.model))
    progress(f"baseline: {len(PROMPTS)} requests one at a time")
    baseline.warm_up(tutorial, list(PROMPTS[0]), ENABLE_THINKING)
    runs = baseline.run_baseline(tutorial, list(PROMPTS), max_new_tokens=mode.max_new_tokens,
                                 enable_thinking=ENABLE_THINKING)
    del tutorial
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return limits, runs, dtype


def measure_product(
    model_dir: Path, config: product.WorkerConfig, mode: Mode, log_dir: Path
) -> tuple[list[product.JobRun], dict[int, product.LevelRun]]:
    """Step 3: one worker for the whole sweep, as a deployment would keep it."""
    options = {"max_new_tokens": mode.max_new_tokens, "enable_thinking": ENABLE_THINKING}
    progress(f"product: starting redis-server and a worker ({config}); logs in {log_dir}")
    with product.running_product(model_dir, config, log_dir, RESULT_TIMEOUT_S) as client:
        product.warm_up(client, list(PROMPTS[0]), ENABLE_THINKING)
        progress(f"product: the {len(PROMPTS)} baseline requests one at a time")
        single = product.run_one_at_a_time(client, list(PROMPTS), **options)
        levels = {}
        for n in mode.levels:
            progress(f"product: N={n} concurrent jobs")
            levels[n] = product.run_level(client, [prompt_for(i) for i in range(n)], **options)
    return single, levels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = choose_mode(args)
    device = resolve_device(args.device)
    model_dir = prepare_model_dir(args)
    manifest = read_manifest(model_dir)
    model_name = manifest.repo_id.rsplit("/", 1)[-1]
    config = worker_config(args, mode, device)

    limits, baseline_runs, dtype = measure_limit_and_baseline(model_dir, device, args, mode)
    machine = machine_info(device, dtype)
    log_dir = Path(tempfile.mkdtemp(prefix="chatqueue-bench-"))
    single, levels = measure_product(model_dir, config, mode, log_dir)
    machine["load_average_end"] = list(os.getloadavg())

    baseline_summary = report.summarise_baseline(baseline_runs, limits)
    results = {
        "mode": mode.name,
        "machine": machine,
        "config": {
            "model_name": model_name, "model_id": manifest.repo_id,
            "model_revision": manifest.commit, "model_dir": str(model_dir),
            "device": str(device), "dtype": machine["dtype"],
            "max_new_tokens": mode.max_new_tokens, "greedy": True, "ignore_eos": True,
            "enable_thinking": ENABLE_THINKING, "concurrency_levels": list(mode.levels),
            "prompt_tokens": [r.prompt_tokens for r in baseline_runs],
            "worker": asdict(config), "worker_log_dir": str(log_dir),
        },
        "limit": limits,
        "baseline": baseline_summary,
        "single_job": report.summarise_single_jobs(single, baseline_runs),
        "concurrency": [
            report.summarise_level(n, run, mode.max_new_tokens, baseline_summary["tokens_per_s"],
                                   limits)
            for n, run in levels.items()
        ],
    }
    stem = f"{model_name}-{mode.name}"
    json_path, chart_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    report.write_json(results, json_path)
    report.write_chart(results, chart_path)
    print(report.format_table(results))
    print(f"\nresults: {json_path}\nchart:   {chart_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
