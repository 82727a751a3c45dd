"""Nothing accepted is lost: worker crashes, shutdowns and Redis restarts, on real processes.

Every test here runs on this module's own Redis (with the AOF on, as compose runs it): the
workers use a short visibility timeout so that redelivery happens within seconds, and kombu
applies the sweeping worker's timeout to every unacknowledged job in the database -- a
long-running job of another test's worker on the shared Redis would be handed out again.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from chatqueue_dev.models import TINY_MESSAGES
from producer import ChatQueueClient, ChatRequest, JobFailed, JobNotFound, ProducerSettings
from producer.celery_app import celery_config
from producer.schemas import StreamEvent
from tests.support.logs import wait_logged
from tests.support.servers import (
    RedisServer,
    WorkerProcess,
    redis_server,
    spawn_worker,
    wait_ready,
    wait_until,
    worker_env,
)
from worker.result_store import WorkerLoader
from worker.settings import WorkerSettings

pytestmark = pytest.mark.integration

# Short delivery settings: a dead worker's job is back after ~8 s (+ up to 1 s).
FAST_REDELIVERY = {"max_job_seconds": "5", "visibility_timeout_s": "8", "redelivery_check_s": "1",
                   "job_lease_ttl_s": "3", "job_lease_renew_s": "1"}
FINAL = ("SUCCESS", "FAILURE")


@pytest.fixture(scope="module")
def fault_redis() -> Iterator[RedisServer]:
    with redis_server(appendonly=True) as server:
        yield server


@pytest.fixture()
def start(fault_redis: RedisServer, tiny_model_dir: Path,
          tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers on the module's Redis; the test's workers are gone when it ends."""
    fault_redis.client().flushall()
    started: list[WorkerProcess] = []

    def start_worker(queue: str, *, ready: bool = True, **settings: str) -> WorkerProcess:
        defaults = {"concurrency": "1", "default_max_new_tokens": "16",
                    "max_new_tokens_cap": "4096"}
        env = worker_env(fault_redis.url, tiny_model_dir, queue, **{**defaults, **settings})
        worker = spawn_worker(env, tmp_path)
        started.append(worker)
        if ready:
            wait_ready(worker)
        return worker

    yield start_worker
    for worker in started:
        if worker.process.poll() is None:
            worker.process.kill()
            worker.process.wait()


def client_for(server: RedisServer, queue: str, **settings: object) -> ChatQueueClient:
    return ChatQueueClient(ProducerSettings(broker_url=server.url, queue=queue,
                                            wait_timeout_s=120, **settings))


def submit(client: ChatQueueClient, **params: object) -> str:
    return client.submit(ChatRequest.model_validate(
        {"messages": TINY_MESSAGES, "params": {"do_sample": False, **params}}))


def generating(client: ChatQueueClient, job_id: str) -> None:
    wait_until(lambda: (p := client.progress(job_id)) is not None and p.tokens > 0,
               timeout=120, what=f"job {job_id} to be generating")


def received(worker: WorkerProcess, job_id: str) -> bool:
    return any(f"[{job_id}] received" in line for line in worker.lines)


def node(worker: WorkerProcess) -> str:
    return worker.name.split("@")[0]


class FinalWrites:
    """Counts the final states stored for some jobs, as Redis publishes each stored state."""

    def __init__(self, server: RedisServer, job_ids: list[str]) -> None:
        self.server = server
        self.counts = dict.fromkeys(job_ids, 0)
        self.markers: set[str] = set()
        self._pubsub = server.client().pubsub(ignore_subscribe_messages=True)
        self._pubsub.subscribe(*[f"celery-task-meta-{job_id}" for job_id in job_ids])
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        try:
            for message in self._pubsub.listen():
                meta = json.loads(message["data"])
                if meta["status"] in FINAL:
                    self.counts[meta["task_id"]] += 1
                elif meta["status"] == "MARKER":
                    self.markers.add(meta["marker"])
        except redis.ConnectionError:
            return  # the module's Redis stopped

    def caught_up(self, job_id: str) -> None:
        """Wait until every state stored for the job so far has been counted: Redis delivers
        a channel's messages in order, so a marker published now arrives after them."""
        marker = uuid.uuid4().hex
        self.server.client().publish(f"celery-task-meta-{job_id}",
                                     json.dumps({"status": "MARKER", "marker": marker}))
        wait_until(lambda: marker in self.markers, timeout=10, what="the counter to catch up")


def stored_meta(server: RedisServer, job_id: str) -> dict[str, object] | None:
    raw = server.client().get(f"celery-task-meta-{job_id}")
    return None if raw is None else json.loads(raw)


def settled(server: RedisServer, queue: str) -> bool:
    """Nothing left to deliver: the queue is empty and no delivery awaits its ack."""
    client = server.client()
    return client.llen(queue) == 0 and client.hlen("unacked") == 0


# ----------------------------------------------------------------------------- kill -9


def test_killed_worker_job_runs_again_on_another_with_one_result(fault_redis, start):
    queue = f"kill-{uuid.uuid4().hex[:6]}"
    workers = [start(queue, **FAST_REDELIVERY), start(queue, **FAST_REDELIVERY)]
    with client_for(fault_redis, queue) as client, client_for(fault_redis, queue) as reader:
        job_id = submit(client, max_new_tokens=100, ignore_eos=True)
        finals = FinalWrites(fault_redis, [job_id])
        events: list[StreamEvent] = []

        def read_stream() -> None:
            for event in reader.stream(job_id, timeout=90):
                events.append(event)

        threading.Thread(target=read_stream, daemon=True).start()
        victim = wait_until(lambda: next((w for w in workers if received(w, job_id)), None),
                            timeout=60, what="a worker to take the job")
        survivor = next(w for w in workers if w is not victim)
        generating(client, job_id)

        victim.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        wait_until(lambda: received(survivor, job_id), timeout=60,
                   what="the job to be delivered again")
        redelivered_after = time.monotonic() - killed_at
        result = client.result(job_id)
        wait_until(lambda: settled(fault_redis, queue), timeout=30, what="the ack")
        finals.caught_up(job_id)

    print(f"redelivered {redelivered_after:.1f} s after kill -9 (visibility timeout 8 s)")
    # Bounded by the settings: visibility timeout + one check, with room for a busy machine.
    assert redelivered_after <= 8 + 1 + 5
    assert result.worker_name is not None and result.worker_name.startswith(node(survivor))
    assert result.finish_reason in ("length", "timeout") and result.usage.completion_tokens > 0
    assert finals.counts[job_id] == 1
    assert stored_meta(fault_redis, job_id)["status"] == "SUCCESS"
    # The stream said it restarted, and what follows the last start is the stored result.
    wait_until(lambda: events and events[-1].type == "end", timeout=30, what="the stream's end")
    starts = [i for i, event in enumerate(events) if event.type == "start"]
    assert len(starts) == 2
    after = events[starts[-1]:]
    assert "".join(e.text for e in after if e.type == "thinking") == result.thinking
    assert "".join(e.text for e in after if e.type == "content") == result.content


def test_a_job_delivered_again_after_it_ended_keeps_its_one_result(fault_redis, start):
    """A publish retried after a lost reply, or a worker killed between storing the result and
    the ack, delivers a finished job again: its result stands and it does not run again."""
    queue = f"twice-{uuid.uuid4().hex[:6]}"
    worker = start(queue, concurrency="2", **FAST_REDELIVERY)
    # Published around the producer's job record (which would queue the same request once),
    # as a retried publish or a redelivery puts a job in the queue again.
    raw = Celery("raw-publisher", set_as_current=False)
    raw.conf.update(celery_config(ProducerSettings(broker_url=fault_redis.url)))
    with client_for(fault_redis, queue) as client:
        job_id = f"twice-{uuid.uuid4().hex[:8]}"
        body = {"request": {"messages": TINY_MESSAGES, "params": {"do_sample": False},
                            "job_id": job_id}}
        finals = FinalWrites(fault_redis, [job_id])
        # Two deliveries at once: one runs, the other waits for its lease, then skips it.
        client.submit(body["request"])
        raw.send_task("chatqueue.generate_chat", kwargs=body, task_id=job_id, queue=queue)
        first = client.result(job_id)
        wait_until(lambda: settled(fault_redis, queue), timeout=60, what="both deliveries")
        stored = stored_meta(fault_redis, job_id)

        # And once more, well after it ended.
        raw.send_task("chatqueue.generate_chat", kwargs=body, task_id=job_id, queue=queue)
        wait_until(lambda: worker.log().count("already has a final result: this delivery is "
                                              "skipped") >= 2,
                   timeout=60, what="the second and late deliveries to be skipped")
        wait_until(lambda: settled(fault_redis, queue), timeout=30, what="its ack")
        finals.caught_up(job_id)
    raw.close()

    assert finals.counts[job_id] == 1
    assert worker.log().count(f"job {job_id} done:") == 1  # one generation
    assert stored_meta(fault_redis, job_id) == stored  # never replaced
    assert client.result(job_id) == first


def test_the_result_backend_keeps_a_jobs_first_final_state(fault_redis):
    # The worker's result backend (not worker.app itself: importing it puts this process offline).
    app = Celery("backend-test", set_as_current=False, loader=WorkerLoader)
    app.conf.update(celery_config(WorkerSettings(_env_file=None, broker_url=fault_redis.url)))
    backend = app.backend
    done, failed = f"done-{uuid.uuid4().hex[:6]}", f"failed-{uuid.uuid4().hex[:6]}"
    backend.store_result(done, {"content": "first"}, "SUCCESS")
    backend.store_result(done, JobFailed({"code": "internal_error", "message": "late"}), "FAILURE")
    backend.store_result(failed, JobFailed({"code": "invalid_request", "message": "no"}),
                         "FAILURE")
    backend.store_result(failed, None, "STARTED")  # a second run starting
    backend.store_result(failed, {"content": "second"}, "SUCCESS")

    assert stored_meta(fault_redis, done)["result"] == {"content": "first"}
    assert stored_meta(fault_redis, failed)["status"] == "FAILURE"

    # Two runs finishing at once: the transaction lets exactly one write.
    racing = f"race-{uuid.uuid4().hex[:6]}"
    finals = FinalWrites(fault_redis, [racing])
    threads = [threading.Thread(target=backend._set_with_state,
                                args=(backend.get_key_for_task(racing),
                                      backend.encode({"status": "SUCCESS", "task_id": racing,
                                                      "result": n}), "SUCCESS"))
               for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    finals.caught_up(racing)
    assert finals.counts[racing] == 1


# ----------------------------------------------------------------------------- SIGTERM


def test_sigterm_finishes_running_jobs_within_the_grace_and_requeues_the_rest(fault_redis, start):
    queue = f"term-{uuid.uuid4().hex[:6]}"
    grace = 5.0
    patient = {"max_job_seconds": "60", "visibility_timeout_s": "70", "redelivery_check_s": "1"}
    first = start(queue, concurrency="2", shutdown_grace_s=str(grace), **patient)
    with client_for(fault_redis, queue) as client:
        long_job = submit(client, max_new_tokens=3000, ignore_eos=True)
        generating(client, long_job)
        short_job = submit(client, max_new_tokens=30, ignore_eos=True)
        generating(client, short_job)
        queued_job = submit(client)  # both slots are busy: this one waits in Redis

        first.process.send_signal(signal.SIGTERM)
        stopping_at = time.monotonic()
        assert first.process.wait(timeout=grace + 30) == 0
        stopped_after = time.monotonic() - stopping_at

        finished = client.result(short_job)  # finished within the grace, by the first worker
        assert finished.worker_name.startswith(node(first))
        assert finished.finish_reason == "length"
        assert client.state(long_job) not in FINAL
        assert fault_redis.client().llen(queue) == 2  # the long job is back, the queued one kept
        wait_logged(first, "goes back to the queue")  # logged before its exit, read through a pipe

        second = start(queue, concurrency="2", **patient)
        assert client.result(queued_job).worker_name.startswith(node(second))
        generating(client, long_job)
        client.cancel(long_job)
        rerun = client.result(long_job)
        assert rerun.worker_name.startswith(node(second))
        assert rerun.finish_reason == "cancelled"
    assert stopped_after <= grace + 15
    print(f"SIGTERM: the worker exited {stopped_after:.1f} s after it (grace {grace:.0f} s)")


# ----------------------------------------------------------------------------- Redis restart


def test_redis_restart_with_jobs_queued_and_running_loses_none(fault_redis, start):
    queue = f"restart-{uuid.uuid4().hex[:6]}"
    patient = {"max_job_seconds": "60", "visibility_timeout_s": "70", "redelivery_check_s": "1"}
    worker = start(queue, concurrency="2", **patient)
    with client_for(fault_redis, queue) as client:
        before = [submit(client, max_new_tokens=60, ignore_eos=True) for _ in range(6)]
        generating(client, before[0])

        fault_redis.restart()  # SIGTERM: Redis writes its AOF and exits; then it loads it again
        after = [submit(client, max_new_tokens=8) for _ in range(2)]  # the same client reconnects

        results = {job_id: client.result(job_id) for job_id in before + after}
        first_seen = {job_id: stored_meta(fault_redis, job_id) for job_id in results}
        wait_until(lambda: settled(fault_redis, queue), timeout=90, what="every ack")

    assert all(result.job_id == job_id for job_id, result in results.items())
    assert [r.finish_reason for r in results.values()] == ["length"] * 8
    # One stored result each, never replaced by a second run after the restart.
    assert {job_id: stored_meta(fault_redis, job_id) for job_id in results} == first_seen
    assert worker.process.poll() is None
    assert "Unrecoverable error" not in worker.log()


# ----------------------------------------------------------------------------- expiry


def test_a_result_read_after_it_expired_is_job_not_found_not_a_hang(fault_redis, start):
    queue = f"ttl-{uuid.uuid4().hex[:6]}"
    # Short enough to wait out, long enough that the job's result (stored ~0.1 s after the
    # submit) is still there when a loaded client starts waiting for it (2 s was not, in CI).
    start(queue, result_ttl_s="6")
    with client_for(fault_redis, queue, result_ttl_s=6) as client:
        job_id = submit(client)
        assert client.result(job_id).job_id == job_id

        def expired() -> bool:
            try:
                client.fetch(job_id)
            except JobNotFound:
                return True
            return False

        wait_until(expired, timeout=30, what="the result to expire")
        began = time.monotonic()
        with pytest.raises(JobNotFound, match="expired"):
            client.result(job_id, timeout=60)
        assert time.monotonic() - began < 5
        with pytest.raises(JobNotFound):
            client.result(f"never-{uuid.uuid4().hex}", timeout=60)


def test_a_queued_job_is_not_mistaken_for_an_unknown_one(fault_redis):
    # No worker consumes this queue: the job stays queued.
    with client_for(fault_redis, f"idle-{uuid.uuid4().hex[:6]}") as client:
        job_id = submit(client)
        assert client.fetch(job_id) is None
        with pytest.raises(TimeoutError):
            client.result(job_id, timeout=1)
        with pytest.raises(JobFailed):  # validated before anything is queued
            client.submit({"messages": []})
