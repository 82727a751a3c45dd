"""Soak: many jobs, valid and invalid, through worker kills and a Redis restart; none lost.

    .venv/bin/python -m benchmarks.soak --short   # CI: 60 jobs, about 2-4 minutes on 2 cores
    .venv/bin/python -m benchmarks.soak           # 300 jobs, about 10 minutes on 2 cores
    .venv/bin/python -m benchmarks.soak --short --failover   # Redis Sentinel: the primary fails

On loopback only: a real redis-server (AOF on, as compose runs it) and two real `chatqueue-worker
run` processes on the tiny test model (built once, as the tests do). While jobs are submitted at
a steady pace it SIGKILLs a worker and starts a new one, restarts Redis (SIGTERM, then start on
the same port and directory), and does the kill-and-replace once more. Then it waits for every
job and prints what became of them:

- submitted: jobs the producer accepted (submit() returned);
- completed: a ChatResult; failed: a structured JobError (the invalid ones, and any other);
- lost: no final result within the time limit;
- duplicated: more than one final result stored for a job (seen as Redis publishes each
  stored state), or a stored result replaced after it was first read;
- redelivered: jobs a second worker received (after a kill or the Redis restart): expected.

With --failover, Redis is a primary, a replica and three sentinels (chatqueue_dev/sentinel.py,
down-after 1 s), workers and producer know only the sentinels, and instead of the Redis restart
the primary is SIGKILLed (then restarted: it rejoins as a replica); the producer submits with
CHATQUEUE_SUBMIT_MIN_REPLICAS (--min-replicas, default 1), so no accepted job can be lost with
the primary. `failover_s` is the kill -> new primary time.

Lost and duplicated must be 0: the exit status is 1 otherwise. Everything is bounded: the job
count, each job's length, and the whole run (--time-limit).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis as redis_py

from chatqueue_dev.sentinel import SentinelCluster, sentinel_cluster, wait_for_new_primary
from chatqueue_dev.servers import (
    RedisServer,
    WorkerProcess,
    redis_server,
    spawn_worker,
    tiny_model_dir,
    wait_ready,
    wait_until,
    worker_env,
)
from producer import ChatQueueClient, JobFailed, JobNotFound, ProducerSettings
from producer.settings import TASK_NAME

QUEUE = "soak"
HA_QUEUE = "chatqueue.soak"  # --failover runs on the role ACL, whose users reach chatqueue.* only
# Short enough that a killed worker's jobs come back within the run: ~visibility + check.
WORKER_SETTINGS = {
    "max_job_seconds": "12",
    "visibility_timeout_s": "20",
    "job_lease_ttl_s": "6",
    "job_lease_renew_s": "2",
    "redelivery_check_s": "1",
    "shutdown_grace_s": "5",
    "concurrency": "4",
    "max_new_tokens_cap": "64",
    "default_max_new_tokens": "16",
    "max_messages": "8",
    "torch_threads": "1",  # two workers share the machine's cores
}
VALID_PROMPTS = ["Hello, who are you?", "What is 2 + 2?", "Say something short.", "Why?"]
INVALID_REQUESTS: list[Any] = [
    {"messages": []},
    {"messages": [{"role": "robot", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "params": {"temperature": -1}},
    {"messages": [{"role": "user", "content": "hi"}], "params": {"max_new_tokens": 4096}},
    {"messages": [{"role": "user", "content": "hi"}] * 9},
    {"messages": [{"role": "user", "content": "a\ud800"}]},
    {"messages": "hello"},
    "not even an object",
]
FINAL = ("SUCCESS", "FAILURE")
RECEIVED = re.compile(r"chatqueue\.generate_chat\[([^\]]+)\] received")


@dataclass
class Report:
    submitted: int = 0
    completed: int = 0
    failed: int = 0  # with a structured JobError
    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0  # a valid job that failed, or an invalid one that did not
    redelivered: int = 0
    submit_retries: int = 0  # submits that raised (Redis away) and were sent again
    failover_s: float | None = None  # --failover: SIGKILL of the primary -> a new one named
    elapsed_s: float = 0.0
    events: list[str] = field(default_factory=list)


class FinalWrites:
    """Counts the final states stored per job, as Redis publishes every stored state; follows
    Redis through its restart (a publish during the reconnect itself can go unseen)."""

    def __init__(self, server: RedisServer | SentinelCluster) -> None:
        self.server = server
        self.counts: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-finals", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = _admin(self.server).pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe("celery-task-meta-*")
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        meta = json.loads(message["data"])
                        if meta.get("status") in FINAL:
                            self.counts[meta["task_id"]] += 1
            except (redis_py.ConnectionError, redis_py.TimeoutError):
                self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Soak:
    def __init__(self, jobs: int, invalid_share: float, time_limit_s: float,
                 model_dir: Path, log_dir: Path, seed: int) -> None:
        self.jobs = jobs
        self.invalid_share = invalid_share
        self.deadline = time.monotonic() + time_limit_s
        self.model_dir = model_dir
        self.log_dir = log_dir
        self.random = random.Random(seed)
        self.report = Report()
        self.expect_valid: dict[str, bool] = {}
        self.workers: list[WorkerProcess] = []
        self.started = time.monotonic()
        self.queue = QUEUE

    def note(self, text: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f}s] {text}"
        self.report.events.append(line)
        print(line, file=sys.stderr, flush=True)

    def run(self, server: RedisServer | SentinelCluster, min_replicas: int = 0) -> Report:
        if isinstance(server, SentinelCluster):
            self.queue = HA_QUEUE
            env = worker_env("redis://sentinel-named-primary/0", self.model_dir, self.queue,
                             **WORKER_SETTINGS, **server.worker_settings())
            settings = ProducerSettings(_env_file=None, queue=self.queue, wait_timeout_s=60,
                                        submit_min_replicas=min_replicas,
                                        **server.producer_settings())
            redis_chaos = lambda: self.fail_over(server)  # noqa: E731
        else:
            env = worker_env(server.url, self.model_dir, QUEUE, **WORKER_SETTINGS)
            settings = ProducerSettings(broker_url=server.url, queue=QUEUE, wait_timeout_s=60)
            redis_chaos = lambda: self.restart_redis(server)  # noqa: E731
        for _ in range(2):
            self.workers.append(spawn_worker(env, self.log_dir))
        for worker in self.workers:
            wait_ready(worker)
        self.note("2 workers ready")
        finals = FinalWrites(server)
        with ChatQueueClient(settings) as client:
            # The chaos happens at these points of the submissions, each one once.
            chaos = {self.jobs // 5: lambda: self.replace_busy_worker(client, env),
                     self.jobs * 9 // 20: redis_chaos,
                     self.jobs * 7 // 10: lambda: self.replace_busy_worker(client, env)}
            pace_s = 0.5
            for index in range(self.jobs):
                if index in chaos:
                    chaos[index]()
                self.submit(client, index)
                time.sleep(pace_s)  # a steady load, not a synchronisation
            self.note(f"{self.report.submitted} jobs submitted")
            first_seen = self.collect(client, server)
        finals.stop()
        for worker in self.workers:
            worker.stop()
        self.count_duplicates(server, finals, first_seen)
        self.count_redeliveries()
        self.report.elapsed_s = round(time.monotonic() - self.started, 1)
        return self.report

    def submit(self, client: ChatQueueClient, index: int | str, *, long: bool = False) -> str:
        job_id = f"soak-{index:04d}-{uuid.uuid4().hex[:6]}" if isinstance(index, int) \
            else f"soak-{index}-{uuid.uuid4().hex[:6]}"
        valid = long or self.random.random() >= self.invalid_share
        # Drawn once: a retry sends the same request under the same id (another one would be
        # refused as a conflicting use of the id).
        request = {
            "job_id": job_id,
            "messages": [{"role": "user", "content": self.random.choice(VALID_PROMPTS)}],
            "params": {"max_new_tokens": 64 if long else self.random.randint(4, 40),
                       "ignore_eos": long,
                       "do_sample": self.random.random() < 0.5,
                       "seed": self.random.randint(0, 1000)},
        } if valid else self.random.choice(INVALID_REQUESTS)
        while True:
            try:
                if valid:
                    client.submit(request)
                else:  # past the producer's validation, as a buggy client would send it
                    client.app.send_task(TASK_NAME, task_id=job_id, queue=self.queue,
                                         kwargs={"request": request})
                break
            except Exception as exc:  # not accepted: the caller may send it again, same id
                self.report.submit_retries += 1
                self.note(f"submit of {job_id} raised {type(exc).__name__}; sending it again")
                if time.monotonic() > self.deadline:
                    raise
                time.sleep(0.5)
        self.expect_valid[job_id] = valid
        self.report.submitted += 1
        return job_id

    def replace_busy_worker(self, client: ChatQueueClient, env: dict[str, str]) -> None:
        """SIGKILL a worker in the middle of a job, and start a new one in its place."""
        job_id = self.submit(client, "victim", long=True)

        def holder() -> WorkerProcess | None:
            progress = client.progress(job_id)
            if progress is None or progress.tokens == 0:
                return None
            return next((w for w in self.workers if f"[{job_id}] received" in w.log()), None)

        victim = wait_until(holder, timeout=120, what=f"job {job_id} to be generating")
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        self.note(f"worker {victim.name} killed (SIGKILL) in the middle of job {job_id}")
        # The new worker becomes ready while the soak goes on.
        self.workers[self.workers.index(victim)] = spawn_worker(env, self.log_dir)

    def restart_redis(self, server: RedisServer) -> None:
        server.restart()
        self.note("Redis restarted")

    def fail_over(self, cluster: SentinelCluster) -> None:
        """SIGKILL the primary; its supervisor restarts it once the sentinels promoted the
        replica, and it rejoins as a replica."""
        old = cluster.primary()
        killed_at = time.monotonic()
        old.stop(signal.SIGKILL)
        self.note(f"Redis primary :{old.port} killed (SIGKILL)")
        switched_at = wait_for_new_primary(cluster, old.port)
        self.report.failover_s = round(switched_at - killed_at, 2)
        self.note(f"sentinels named :{cluster.primary_port()} primary after "
                  f"{self.report.failover_s} s; restarting the old one as a replica")
        old.start()

    def collect(self, client: ChatQueueClient,
                server: RedisServer | SentinelCluster) -> dict[str, Any]:
        """Wait for every job's final result; returns each stored result as first read."""
        first_seen: dict[str, Any] = {}
        for job_id, valid in self.expect_valid.items():
            outcome = self.wait_for(client, job_id)
            if outcome == "lost":
                self.report.lost += 1
                self.note(f"LOST: {job_id}")
                continue
            setattr(self.report, outcome, getattr(self.report, outcome) + 1)
            if (outcome == "completed") != valid:
                self.report.unexpected += 1
                self.note(f"unexpected: {job_id} ({'valid' if valid else 'invalid'}) {outcome}")
            first_seen[job_id] = _admin(server).get(f"celery-task-meta-{job_id}")
        return first_seen

    def wait_for(self, client: ChatQueueClient, job_id: str) -> str:
        while (left := self.deadline - time.monotonic()) > 0:
            try:
                client.result(job_id, timeout=min(left, 30))
                return "completed"
            except JobFailed:
                return "failed"
            except (TimeoutError, JobNotFound):
                continue
            except Exception as exc:  # Redis away for a moment: ask again
                self.note(f"waiting for {job_id}: {type(exc).__name__}: {exc}")
                time.sleep(0.5)
        return "lost"

    def count_duplicates(self, server: RedisServer | SentinelCluster, finals: FinalWrites,
                         first_seen: dict[str, Any]) -> None:
        client = _admin(server)
        for job_id, seen in first_seen.items():
            replaced = client.get(f"celery-task-meta-{job_id}") != seen
            if finals.counts[job_id] > 1 or replaced:
                self.report.duplicated += 1
                self.note(f"DUPLICATED: {job_id} ({finals.counts[job_id]} final writes, "
                          f"replaced: {replaced})")

    def count_redeliveries(self) -> None:
        receipts: Counter[str] = Counter()
        for path in self.log_dir.glob("*.log"):
            receipts.update(RECEIVED.findall(path.read_text(errors="replace")))
        self.report.redelivered = sum(1 for job_id, count in receipts.items()
                                      if count > 1 and job_id in self.expect_valid)


def _admin(server: RedisServer | SentinelCluster) -> redis_py.Redis:
    """A client of the server, or of whichever node the sentinels name primary now."""
    return server.admin() if isinstance(server, SentinelCluster) else server.client()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="60 jobs, for CI")
    parser.add_argument("--jobs", type=int, help="jobs to submit (default 300; 60 with --short)")
    parser.add_argument("--invalid-share", type=float, default=0.2)
    parser.add_argument("--time-limit", type=float, help="seconds for the whole run "
                        "(default 1200; 420 with --short)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    parser.add_argument("--failover", action="store_true",
                        help="Redis Sentinel (primary, replica, 3 sentinels): the primary is "
                        "SIGKILLed instead of a Redis restart")
    parser.add_argument("--min-replicas", type=int, default=1,
                        help="with --failover: the producer's submit_min_replicas (default 1)")
    args = parser.parse_args(argv)
    jobs = args.jobs or (60 if args.short else 300)
    time_limit = args.time_limit or (420.0 if args.short else 1200.0)
    if not 10 <= jobs <= 5000:
        parser.error("--jobs must be between 10 and 5000")

    redis_setup = sentinel_cluster() if args.failover else redis_server(appendonly=True)
    with tempfile.TemporaryDirectory(prefix="chatqueue-soak-") as log_dir, redis_setup as server:
        soak = Soak(jobs, args.invalid_share, time_limit, tiny_model_dir(), Path(log_dir),
                    args.seed)
        report = soak.run(server, min_replicas=args.min_replicas if args.failover else 0)

    summary = {key: value for key, value in asdict(report).items() if key != "events"}
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key:>15}: {value}")
    return 0 if report.lost == 0 and report.duplicated == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
