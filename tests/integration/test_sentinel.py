"""Redis high availability: jobs flow through a Sentinel failover of the primary.

A real primary and replica (redis-server on the ACL from deploy/redis/acl.sh, started by
deploy/redis/entrypoint.sh) and three real sentinels (deploy/redis/sentinel.sh: redis-server
--sentinel) on loopback, down-after-milliseconds 1000; a real `chatqueue-worker run` and the
producer know only the sentinels. Jobs are submitted at a steady pace while the primary is
SIGKILLed mid-run (jobs queued and running) and restarted as a supervisor would (it comes back as
a replica of the new primary). Every accepted job ends with exactly one result; nothing is told
where the new primary is. The recovery times are printed (README "Guarantees" quotes them).
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py

from producer import ChatQueueClient, JobFailed, ProducerSettings
from producer.errors import NotReplicated
from tests.support.sentinel import SentinelCluster, sentinel_cluster, wait_for_new_primary
from tests.support.servers import spawn_worker, wait_ready, wait_until, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUEUE = "chatqueue.ha"
WORKER = {
    "max_job_seconds": "12", "visibility_timeout_s": "20", "job_lease_ttl_s": "6",
    "job_lease_renew_s": "2", "redelivery_check_s": "1", "concurrency": "4",
    "max_new_tokens_cap": "64", "default_max_new_tokens": "16",
}
FINAL = ("SUCCESS", "FAILURE")


class FinalWrites:
    """Counts the final states stored per job (Redis publishes each stored state), on whichever
    node is primary: a client from the sentinels, reconnecting after the failover."""

    def __init__(self, cluster: SentinelCluster) -> None:
        self.client = cluster.admin()
        self.counts: Counter[str] = Counter()
        self.first_at: dict[str, float] = {}
        self.markers: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe("celery-task-meta-*")
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None:
                        meta = json.loads(message["data"])
                        if meta.get("status") in FINAL:
                            self.counts[meta["task_id"]] += 1
                            self.first_at.setdefault(meta["task_id"], time.monotonic())
                        elif meta.get("status") == "MARKER":
                            self.markers.add(meta["task_id"])
            except (redis_py.ConnectionError, redis_py.TimeoutError):
                self._stop.wait(0.1)

    def caught_up(self, timeout: float = 30) -> None:
        """Wait until every final state published so far has been counted: Redis delivers a
        subscriber's messages in the order they were published, so a marker published now
        arrives after them. A marker is sent again each second: one published while the
        counter reconnects is never heard."""
        sent: list[str] = []
        last_sent_at = -1.0

        def marker_arrived() -> bool:
            nonlocal last_sent_at
            if time.monotonic() - last_sent_at >= 1.0:
                marker = f"marker-{uuid.uuid4().hex}"
                self.client.publish(f"celery-task-meta-{marker}",
                                    json.dumps({"status": "MARKER", "task_id": marker}))
                sent.append(marker)
                last_sent_at = time.monotonic()
            return any(marker in self.markers for marker in sent)

        wait_until(marker_arrived, timeout=timeout, what="the final-write counter to catch up")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Submitter(threading.Thread):
    """Submits jobs at a steady pace; a submit that raises (not accepted) is sent again under
    the same id, as a backend would. Records when each job was accepted."""

    def __init__(self, client: ChatQueueClient, pace_s: float) -> None:
        super().__init__(daemon=True)
        self.client, self.pace_s = client, pace_s
        self.accepted: dict[str, float] = {}
        self.raised: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        index = 0
        while not self.stop.is_set():
            job_id = f"ha-{index:03d}-{uuid.uuid4().hex[:6]}"
            long = index % 4 == 0
            request = {"job_id": job_id,
                       "messages": [{"role": "user", "content": f"Say something {index}."}],
                       "params": {"max_new_tokens": 48 if long else 12, "ignore_eos": long}}
            while True:
                try:
                    self.client.submit(request)
                    break
                except Exception as exc:  # not accepted: send it again, same id
                    self.raised.append(f"{job_id}: {type(exc).__name__}: {exc}")
                    if self.stop.wait(0.2):
                        return
            self.accepted[job_id] = time.monotonic()
            index += 1
            self.stop.wait(self.pace_s)


def test_jobs_flow_through_a_sentinel_failover_and_none_is_lost(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with sentinel_cluster(down_after_ms=1000, failover_timeout_ms=3000) as cluster:
        # The broker URL names no host that exists: only the sentinels lead to Redis.
        env = worker_env("redis://nowhere.invalid:1/0", tiny_model_dir, QUEUE,
                         **WORKER, **cluster.worker_settings())
        worker = spawn_worker(env, tmp_path)
        wait_ready(worker)
        finals = FinalWrites(cluster)
        common: dict[str, Any] = {**cluster.producer_settings(), "queue": QUEUE,
                                  "wait_timeout_s": 60}
        # The submitter asks for the job on one replica (WAIT); the probe does not.
        safe = ChatQueueClient(ProducerSettings(_env_file=None, submit_min_replicas=1,
                                                submit_replica_timeout_s=2, **common))
        plain = ChatQueueClient(ProducerSettings(_env_file=None, **common))
        submitter = Submitter(safe, pace_s=0.25)
        try:
            submitter.start()
            # Kill the primary while jobs are queued and one is generating.
            wait_until(lambda: len(submitter.accepted) >= 12 and any(
                plain.progress(job_id) for job_id in list(submitter.accepted)[-8:]),
                timeout=60, what="jobs queued and one generating")
            old = cluster.primary()
            killed_at = time.monotonic()
            old.stop(signal.SIGKILL)
            switched_at = wait_for_new_primary(cluster, old.port)
            old.start()  # its supervisor restarts it: it comes back as a replica

            # Jobs flowing again: a job submitted after the switch (without WAIT) completes.
            probe = plain.submit({"messages": [{"role": "user", "content": "Back?"}],
                                  "params": {"max_new_tokens": 4}})
            probe_submitted_at = time.monotonic()
            plain.result(probe, timeout=60)
            flowing_at = time.monotonic()
            # And the WAIT producer gets its jobs accepted again once a replica is back.
            wait_until(lambda: any(at > switched_at for at in submitter.accepted.values()),
                       timeout=60, what="a job accepted with WAIT after the failover")
            replicated_again_at = min(at for at in submitter.accepted.values()
                                      if at > switched_at)
            time.sleep(3)  # a steady load for a little longer
            submitter.stop.set()
            submitter.join(timeout=30)

            accepted = [*submitter.accepted, probe]
            outcomes: Counter[str] = Counter()
            for job_id in accepted:
                try:
                    plain.result(job_id, timeout=60)
                    outcomes["completed"] += 1
                except JobFailed as failed:
                    outcomes[f"failed {failed.error.code}"] += 1
                except TimeoutError:
                    outcomes["lost"] += 1
            finals.caught_up()  # every final write stored so far has reached the counter
            duplicated = [job_id for job_id in accepted if finals.counts[job_id] > 1]
            worker_alive = worker.process.poll() is None
        finally:
            submitter.stop.set()
            finals.stop()
            safe.close()
            plain.close()
            worker.stop()

        report = {
            "accepted": len(accepted), **outcomes, "duplicated": len(duplicated),
            "submits_raised": len(submitter.raised),
            "kill_to_new_primary_s": round(switched_at - killed_at, 2),
            "new_primary_to_job_done_s": round(flowing_at - switched_at, 2),
            "probe_submit_to_done_s": round(flowing_at - probe_submitted_at, 2),
            "new_primary_to_wait_submit_accepted_s": round(replicated_again_at - switched_at, 2),
        }
        print("sentinel failover:", json.dumps(report))
        assert outcomes == Counter(completed=len(accepted)), (report, worker.log()[-3000:])
        assert not duplicated, report
        assert worker_alive, "the worker must ride out the failover"
        assert "Unrecoverable error" not in worker.log()
        # The worker (kombu, result backend, our clients) and the producers asked the sentinels
        # as their "client" user all along, the failover included: nothing was refused.
        assert cluster.acl_refusals() == []


def test_submit_with_min_replicas_returns_only_once_a_replica_has_the_job() -> None:
    """CHATQUEUE_SUBMIT_MIN_REPLICAS=1: with the replica stopped (SIGSTOP) submit() raises
    NotReplicated (not accepted); once it runs again the same request under the same id is
    accepted, and the replica holds the job's message and record when submit() returns."""
    with sentinel_cluster() as cluster:
        settings = ProducerSettings(_env_file=None, queue=QUEUE, submit_min_replicas=1,
                                    submit_replica_timeout_s=1, **cluster.producer_settings())
        replica = next(node for node in cluster.nodes if node.port != cluster.primary_port())
        assert replica.process is not None
        request = {"job_id": f"wait-{uuid.uuid4().hex[:8]}",
                   "messages": [{"role": "user", "content": "Replicated?"}]}
        with ChatQueueClient(settings) as client:
            replica.process.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(NotReplicated):
                    client.submit(request)
                waited = time.monotonic() - started
            finally:
                replica.process.send_signal(signal.SIGCONT)
            job_id = client.submit(request)
        assert waited > 1  # it waited for the replica (its limit: about 15 s)
        on_replica = replica.client()
        assert on_replica.get(f"chatqueue:accepted:{job_id}").startswith(b"queued ")
        queued = [key for key in on_replica.keys(f"{QUEUE}*")]
        assert queued and any(job_id.encode() in message for key in queued
                              for message in on_replica.lrange(key, 0, -1))
