"""A batch through the queue against the same file fed to the engine alone (issue 15).

`vllm run-batch` reads a file in one process and feeds every line to its engine: no broker, no
task slots, no results in Redis. Here that is `engine`: this process loads the model, maps each
line with producer.batches and submits it to a `worker.engine.Engine` directly. `queue` is the
product: a real redis-server, one real `chatqueue-worker run` process, the file submitted with
`BatchClient` and waited for (from the first line read to the batch's last count). Same model,
settings, prompts (benchmarks.prompts) and greedy decoding on both sides, so both generate the
same tokens. `--repeats N` alternates engine, queue, engine, queue, ... so a change of the
machine's load between phases shows up as a spread instead of as a ratio.

Prints and writes (benchmarks/results/batch_vs_engine.json) each side's wall time, the ratio
queue / engine (issue 15's target: at most 1.10), and the load average around each phase.

Quick check (a minute or two):

    .venv/bin/python -m benchmarks.batch_vs_engine --lines 20 --out /tmp/batch_vs_engine.json

The full measurement (demo model, 500 lines x 32 new tokens, 32 rows and task slots; about
15-20 minutes on a quiet 2-core CPU; run it plainly, not under nice, on a quiet machine):

    .venv/bin/python -m benchmarks.batch_vs_engine --lines 500 --max-tokens 32 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from benchmarks.prompts import prompt_for
from benchmarks.run import cpu_model
from chatqueue_dev.models import build_demo_model
from chatqueue_dev.servers import REPO_ROOT, redis_server, spawn_worker, wait_ready, worker_env
from producer import ChatQueueClient, ProducerSettings
from producer.batches import BatchClient, map_body, parse_line
from worker.manifest import read_manifest
from worker.metrics import WorkerMetrics
from worker.model import load_model, resolve_device
from worker.service import prepare_job
from worker.settings import WorkerSettings
from worker.startup import WorkerRuntime

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "batch_vs_engine.json"


def write_file(path: Path, lines: int, max_tokens: int) -> None:
    with path.open("w") as file:
        for i in range(lines):
            body = {"messages": prompt_for(i), "max_tokens": max_tokens, "temperature": 0}
            file.write(json.dumps({"custom_id": f"l{i}", "body": body}) + "\n")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class EngineAlone:
    """The model loaded once in this process (as run-batch holds it); each run starts a fresh
    engine on it, warmed up, as each queue run starts a fresh worker: no run finds the prompts
    of an earlier one in its prefix cache."""

    def __init__(self, settings: WorkerSettings) -> None:
        if settings.torch_threads is not None:
            torch.set_num_threads(settings.torch_threads)  # as the worker does
        manifest = read_manifest(settings.resolved_model_dir)
        self.settings = settings
        self.loaded = load_model(settings.resolved_model_dir, manifest,
                                 device=resolve_device(settings.device), dtype=settings.dtype)

    def run(self, path: Path) -> tuple[float, int]:
        """Seconds from reading the file to the last line's output, and tokens generated."""
        runtime = WorkerRuntime.start(self.settings, self.loaded,
                                      WorkerMetrics(self.settings.model_id))
        try:
            runtime.warm_up()
            started = time.monotonic()
            jobs = []
            with path.open("rb") as file:
                for index, text in enumerate(file):
                    request = map_body(parse_line(text, index).body)
                    jobs.append(runtime.engine.submit(
                        prepare_job(runtime, request).engine_request))
            tokens = sum(len(job.future.result().token_ids) for job in jobs)
            return time.monotonic() - started, tokens
        finally:
            runtime.stop()


def through_the_queue(path: Path, model_dir: Path, worker_settings: dict[str, str],
                      lines: int) -> tuple[float, int]:
    """Seconds from the submission's start to the batch's completion, and tokens generated
    (read from the output lines' usage)."""
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    with redis_server() as server, tempfile.TemporaryDirectory() as logs:
        worker = spawn_worker(worker_env(server.url, model_dir, queue, **worker_settings),
                              Path(logs))
        try:
            wait_ready(worker, timeout=600)
            with ChatQueueClient(ProducerSettings(broker_url=server.url, queue=queue,
                                                  wait_timeout_s=3600)) as client:
                batches = BatchClient(client)
                started = time.monotonic()
                # A new id each repeat: the same file again would resume the finished batch.
                report = batches.submit(path, batch_id=f"batch_bench{uuid.uuid4().hex[:12]}")
                batch = batches.wait(report.batch_id, timeout=3600, interval=0.05)
                elapsed = time.monotonic() - started
                assert batch["request_counts"]["completed"] == lines, batch
                tokens = sum(line["response"]["body"]["usage"]["completion_tokens"]
                             for kind, line in batches.results(report.batch_id)
                             if kind == "output")
                return elapsed, tokens
        finally:
            worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1,
                        help="engine/queue pairs, alternated (default 1)")
    parser.add_argument("--model-dir", type=Path,
                        help="default: the demo model (SmolLM2-135M-Instruct, built if absent)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", default="",
                        help="kept in the results, e.g. what else ran on the machine")
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = REPO_ROOT / WorkerSettings.model_construct().resolved_model_dir
        build_demo_model(model_dir)
    manifest = read_manifest(model_dir)
    common = {"device": "cpu", "concurrency": str(args.concurrency),
              "max_batch_size": str(args.concurrency), "torch_threads": "2"}
    settings = WorkerSettings(model_dir=model_dir, model_id=manifest.repo_id,
                              **{k: v for k, v in common.items() if k != "concurrency"})
    runs: list[dict[str, Any]] = []
    load_start = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        write_file(path, args.lines, args.max_tokens)
        engine = EngineAlone(settings)
        for repeat in range(args.repeats):
            before = load_average()
            engine_s, engine_tokens = engine.run(path)
            print(f"[{repeat}] engine alone {engine_s:.1f} s, load {before}",
                  file=sys.stderr, flush=True)
            middle = load_average()
            queue_s, queue_tokens = through_the_queue(path, model_dir, common, args.lines)
            print(f"[{repeat}] through the queue {queue_s:.1f} s, load {middle}",
                  file=sys.stderr, flush=True)
            runs.append({"engine_alone_s": round(engine_s, 2),
                         "through_the_queue_s": round(queue_s, 2),
                         "queue_over_engine": round(queue_s / engine_s, 3),
                         "tokens_engine": engine_tokens, "tokens_queue": queue_tokens,
                         "load_average_before_engine": before,
                         "load_average_before_queue": middle})
            write_report(args, manifest.repo_id, load_start, runs)
    report = write_report(args, manifest.repo_id, load_start, runs)
    print(json.dumps(report, indent=2))
    print(f"queue / engine = {report['queue_over_engine']} (target <= 1.10); "
          f"load average {load_start} -> {report['load_average_end']}; written to {args.out}")


def write_report(args: argparse.Namespace, model: str, load_start: list[float],
                 runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The results so far, written after every repeat: a long run cut short keeps its pairs."""
    engine_median = statistics.median(r["engine_alone_s"] for r in runs)
    queue_median = statistics.median(r["through_the_queue_s"] for r in runs)
    report = {
        "benchmark": "batch_vs_engine", "model": model, "lines": args.lines,
        "max_tokens": args.max_tokens, "concurrency": args.concurrency, "device": "cpu",
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": load_start, "load_average_end": load_average(),
        "repeats_done": len(runs), "repeats_asked": args.repeats,
        "runs": runs,
        "engine_alone_s_median": round(engine_median, 2),
        "through_the_queue_s_median": round(queue_median, 2),
        "queue_over_engine": round(queue_median / engine_median, 3),
        "target_queue_over_engine": 1.10,
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report

if __name__ == "__main__":
    main()
