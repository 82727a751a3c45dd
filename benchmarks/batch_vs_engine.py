"""A batch through the queue against the same file fed to the engine alone (issue 15).

`vllm run-batch` reads a file in one process and feeds every line to its engine: no broker, no
task slots, no results in Redis. Here that is `engine`: this process loads the model, maps each
line with producer.batches and submits it to a `worker.engine.Engine` directly. `queue` is the
product: a real redis-server, one real `chatqueue-worker run` process, the file submitted with
`BatchClient` and waited for. Same model, settings, prompts (benchmarks.prompts) and greedy
decoding on both sides, so both generate the same tokens. Prints both wall times and the ratio.

    .venv/bin/python -m benchmarks.batch_vs_engine [--lines 500] [--max-tokens 32] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.prompts import prompt_for
from producer import ChatQueueClient, ProducerSettings
from producer.batches import BatchClient, map_body, parse_line
from tests.support.servers import REPO_ROOT, redis_server, spawn_worker, wait_ready, worker_env
from worker import devmodels
from worker.manifest import read_manifest
from worker.metrics import WorkerMetrics
from worker.model import load_model, resolve_device
from worker.service import WorkerRuntime, prepare_job
from worker.settings import WorkerSettings


def write_file(path: Path, lines: int, max_tokens: int) -> None:
    with path.open("w") as file:
        for i in range(lines):
            body = {"messages": prompt_for(i), "max_tokens": max_tokens, "temperature": 0}
            file.write(json.dumps({"custom_id": f"l{i}", "body": body}) + "\n")


def engine_alone(path: Path, settings: WorkerSettings) -> tuple[float, int]:
    """Seconds from reading the file to the last line's output, and tokens generated."""
    manifest = read_manifest(settings.resolved_model_dir)
    loaded = load_model(settings.resolved_model_dir, manifest,
                        device=resolve_device(settings.device), dtype=settings.dtype)
    runtime = WorkerRuntime.start(settings, loaded, WorkerMetrics(settings.model_id))
    try:
        runtime.warm_up()
        started = time.monotonic()
        jobs = []
        with path.open("rb") as file:
            for index, text in enumerate(file):
                request = map_body(parse_line(text, index).body)
                jobs.append(runtime.engine.submit(prepare_job(runtime, request).engine_request))
        tokens = sum(len(job.future.result().token_ids) for job in jobs)
        return time.monotonic() - started, tokens
    finally:
        runtime.stop()


def through_the_queue(path: Path, model_dir: Path, worker_settings: dict[str, str],
                      lines: int) -> float:
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
                report = batches.submit(path)
                batch = batches.wait(report.batch_id, timeout=3600, interval=0.1)
                elapsed = time.monotonic() - started
                assert batch["request_counts"]["completed"] == lines, batch
                return elapsed
        finally:
            worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model-dir", type=Path,
                        help="default: the demo model (SmolLM2-135M-Instruct, built if absent)")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = REPO_ROOT / WorkerSettings.model_construct().resolved_model_dir
        devmodels.build_demo_model(model_dir)
    manifest = read_manifest(model_dir)
    common = {"device": "cpu", "concurrency": str(args.concurrency),
              "max_batch_size": str(args.concurrency), "torch_threads": "2"}
    settings = WorkerSettings(model_dir=model_dir, model_id=manifest.repo_id,
                              **{k: v for k, v in common.items() if k != "concurrency"})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "batch.jsonl"
        write_file(path, args.lines, args.max_tokens)
        engine_s, tokens = engine_alone(path, settings)
        queue_s = through_the_queue(path, model_dir, common, args.lines)
    print(json.dumps({
        "model": manifest.repo_id, "lines": args.lines, "max_tokens": args.max_tokens,
        "tokens": tokens, "engine_alone_s": round(engine_s, 2),
        "through_the_queue_s": round(queue_s, 2),
        "queue_over_engine": round(queue_s / engine_s, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
