"""How long an interactive job waits behind a running batch (issue 15).

A real redis-server, one real worker on the tiny test model, a batch of N lines submitted
through `producer.batches.BatchClient`, and, while it runs, M interactive jobs one every
`--gap` seconds. Prints the interactive jobs' queue wait (p50, p95) against a batch line's
duration, and the batch's throughput. The target: p95 under one line's duration (an
interactive job waits for a task slot, not for the backlog).

    .venv/bin/python -m benchmarks.batch_queue_wait [--lines 300] [--interactive 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from producer import ChatQueueClient, ProducerSettings
from producer.batches import BatchClient, line_job_id
from tests.support.servers import (
    redis_server,
    spawn_worker,
    tiny_model_dir,
    wait_ready,
    worker_env,
)
from worker.devmodels import TINY_MESSAGES


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--interactive", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    queue = f"bench-{uuid.uuid4().hex[:6]}"
    with redis_server() as server, tempfile.TemporaryDirectory() as tmp:
        worker = spawn_worker(worker_env(server.url, tiny_model_dir(), queue,
                                         concurrency=str(args.concurrency)), Path(tmp))
        try:
            wait_ready(worker)
            path = Path(tmp) / "batch.jsonl"
            with path.open("w") as file:
                for i in range(args.lines):
                    body = {"messages": TINY_MESSAGES, "max_tokens": args.max_tokens,
                            "temperature": 1.0, "seed": i}
                    file.write(json.dumps({"custom_id": f"l{i}", "body": body}) + "\n")
            settings = ProducerSettings(broker_url=server.url, queue=queue, wait_timeout_s=600)
            with ChatQueueClient(settings) as client:
                batches = BatchClient(client)
                started = time.monotonic()
                report = batches.submit(path)
                time.sleep(2.0)  # the batch is running
                jobs = []
                for _ in range(args.interactive):
                    jobs.append(client.submit({"messages": TINY_MESSAGES, "params": {
                        "max_new_tokens": args.max_tokens, "do_sample": False}}))
                    time.sleep(args.gap)
                waits = [client.result(job).timings.queue_wait_s or 0.0 for job in jobs]
                batch = batches.wait(report.batch_id, timeout=3600)
                elapsed = time.monotonic() - started
                lines = [client.result(line_job_id(report.batch_id, f"l{i}"))
                         for i in range(args.lines)]
        finally:
            worker.stop()
    durations = [line.timings.generation_s for line in lines]
    print(json.dumps({
        "lines": args.lines, "status": batch["status"], "counts": batch["request_counts"],
        "batch_s": round(elapsed, 2), "lines_per_s": round(args.lines / elapsed, 2),
        "line_duration_s_p50": round(statistics.median(durations), 3),
        "interactive_queue_wait_s_p50": round(statistics.median(waits), 3),
        "interactive_queue_wait_s_p95": round(percentile(waits, 0.95), 3),
        "interactive": args.interactive, "concurrency": args.concurrency,
    }, indent=2))


if __name__ == "__main__":
    main()
