"""How long an interactive job waits behind a running batch (issue 15).

A real redis-server, one real worker on the tiny test model, a batch of N lines submitted
through `producer.batches.BatchClient`, and, while it runs, M interactive jobs one every
`--gap` seconds. Prints the interactive jobs' queue wait (p50, p95) against a batch line's
duration, and the batch's throughput, and writes them to
benchmarks/results/batch_queue_wait.json. The target (issue 15): p95 under one line's duration
(an interactive job waits for a task slot, not for the backlog), so the printed ratio
`wait_p95_over_line_p50` should be under 1.

Quick check (under a minute):

    .venv/bin/python -m benchmarks.batch_queue_wait --lines 30 --interactive 4 --gap 0.3 \
        --out /tmp/batch_queue_wait.json

The full measurement (a 300-line backlog, 20 interactive jobs one every 0.5 s, 4 task slots;
a few minutes on a 2-core CPU; run it plainly on a quiet machine):

    .venv/bin/python -m benchmarks.batch_queue_wait --lines 300 --interactive 20 --gap 0.5
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.run import cpu_model
from chatqueue_dev.models import TINY_MESSAGES
from chatqueue_dev.servers import (
    REPO_ROOT,
    redis_server,
    spawn_worker,
    tiny_model_dir,
    wait_ready,
    worker_env,
)
from producer import ChatQueueClient, ProducerSettings
from producer.batches import BatchClient, line_job_id

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "batch_queue_wait.json"


def percentile(values: list[float], share: float) -> float:
    """Nearest rank: the smallest value with at least `share` of the values at or below it (of
    20 waits, p95 is the 19th, not the largest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--lines", type=int, default=300)
    parser.add_argument("--interactive", type=int, default=20)
    parser.add_argument("--gap", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", default="",
                        help="kept in the results, e.g. what else ran on the machine")
    args = parser.parse_args()
    load_start = [round(x, 2) for x in os.getloadavg()]
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
    line_p50 = statistics.median(durations)
    wait_p50, wait_p95 = statistics.median(waits), percentile(waits, 0.95)
    report = {
        "benchmark": "batch_queue_wait", "model": "tiny-qwen3", "device": "cpu",
        "cpu": cpu_model(), "cores": os.cpu_count(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_start": load_start,
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "lines": args.lines, "interactive": args.interactive, "gap_s": args.gap,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "status": batch["status"], "counts": batch["request_counts"],
        "batch_s": round(elapsed, 2), "lines_per_s": round(args.lines / elapsed, 2),
        "line_duration_s_p50": round(line_p50, 3),
        "interactive_queue_wait_s_p50": round(wait_p50, 3),
        "interactive_queue_wait_s_p95": round(wait_p95, 3),
        "wait_p95_over_line_p50": round(wait_p95 / line_p50, 3),
        "interactive_queue_wait_s_max": round(max(waits), 3),
        "interactive_queue_waits_s": [round(w, 3) for w in waits],
        "target_wait_p95_over_line_p50": 1.0,
        "note": args.note,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"interactive wait p95 / batch line p50 = {report['wait_p95_over_line_p50']} "
          f"(target < 1); load average {load_start} -> {report['load_average_end']}; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
