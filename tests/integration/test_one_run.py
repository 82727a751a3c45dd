"""One job id, one generation; Celery's revoke means our cancel. Real Redis, real workers.

The module has its own Redis: its workers use a short lease (3 s, renewed every second) so a
dead owner's job is taken over within seconds, and one of them is killed.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.request import Request, urlopen

import pytest
from celery import Celery

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES
from producer import ChatQueueClient, ChatRequest, JobIdConflict, JobNotFound, ProducerSettings
from producer.celery_app import create_celery
from producer.cli import EXIT_CONFLICT, EXIT_NOT_FOUND
from producer.cli import main as cli_main
from producer.client import request_digest
from producer.schemas import StreamEvent
from producer.settings import TASK_NAME, accepted_key, lease_key, stream_key
from tests.support.servers import (
    RedisServer,
    WorkerProcess,
    free_port,
    redis_server,
    spawn_worker,
    wait_ready,
    wait_until,
    worker_env,
)
from worker.control import JobControl
from worker.drain import JobInterrupted
from worker.lease import LeaseKeeper

pytestmark = pytest.mark.integration

LONG = 3000  # tokens: seconds of decoding, ample time to act on a running job
SHORT_LEASE = {"job_lease_ttl_s": "3", "job_lease_renew_s": "1"}


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with redis_server() as redis:
        yield redis


@pytest.fixture(scope="module")
def start(server: RedisServer, tiny_model_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []
    logs = tmp_path_factory.mktemp("one-run-logs")

    def start_worker(queue: str, **settings: str) -> WorkerProcess:
        defaults = {"concurrency": "1", "default_max_new_tokens": "64",
                    "max_new_tokens_cap": "4096", **SHORT_LEASE}
        worker = spawn_worker(worker_env(server.url, tiny_model_dir, queue,
                                         **{**defaults, **settings}), logs)
        started.append(worker)
        wait_ready(worker)
        return worker

    yield start_worker
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def pair(start: Callable[..., WorkerProcess]) -> tuple[str, list[WorkerProcess]]:
    """Two workers on one queue, one task slot each: while one runs a job, a second delivery
    of it reaches the other. The module's last test kills one of them."""
    queue = f"pair-{uuid.uuid4().hex[:6]}"
    return queue, [start(queue), start(queue)]


def client_for(server: RedisServer, queue: str) -> ChatQueueClient:
    return ChatQueueClient(ProducerSettings(broker_url=server.url, queue=queue,
                                            wait_timeout_s=120))


def request(job_id: str | None = None, **params: object) -> dict[str, object]:
    return {"messages": TINY_MESSAGES, "params": {"do_sample": False, **params},
            "job_id": job_id}


def generating(client: ChatQueueClient, job_id: str) -> None:
    wait_until(lambda: (p := client.progress(job_id)) is not None and p.tokens > 0,
               timeout=120, what=f"job {job_id} to be generating")


def runs_of(workers: list[WorkerProcess], job_id: str) -> int:
    """Generations of the job: each run that ends logs one "done" line."""
    return sum(1 for worker in workers for line in worker.lines
               if f"job {job_id} done:" in line)


def plain_publisher(server: RedisServer) -> Celery:
    """Publishes as a retried publish or a redelivery would: around the producer's job record."""
    return create_celery(ProducerSettings(broker_url=server.url), name="raw-publisher")


def publish_raw(app: Celery, queue: str, job_id: str, **params: object) -> None:
    body = {"request": request(job_id, **params), "submitted_at": time.time()}
    app.send_task(TASK_NAME, kwargs=body, task_id=job_id, queue=queue)


def read_stream(client: ChatQueueClient, job_id: str) -> list[StreamEvent]:
    events: list[StreamEvent] = []

    def read() -> None:
        events.extend(client.stream(job_id, timeout=120))

    threading.Thread(target=read, daemon=True).start()
    return events


# ----------------------------------------------------------------------------- the producer


def test_the_same_request_again_queues_nothing_and_another_under_its_id_is_refused(server):
    # No worker consumes this queue: what submit() queues stays there to be counted.
    queue = f"idle-{uuid.uuid4().hex[:6]}"
    with client_for(server, queue) as client:
        job_id = f"same-{uuid.uuid4().hex[:8]}"
        assert client.submit(request(job_id)) == job_id
        assert client.submit(ChatRequest.model_validate(request(job_id))) == job_id
        assert server.client().llen(queue) == 1

        with pytest.raises(JobIdConflict, match=job_id) as refused:
            client.submit(request(job_id, max_new_tokens=5))
        assert refused.value.job_id == job_id
        assert server.client().llen(queue) == 1

        # A submit that raised after writing the record (Redis went away mid-publish) may not
        # have queued the job: the same request again publishes it (a duplicate runs once).
        lost = f"lost-{uuid.uuid4().hex[:8]}"
        body = ChatRequest.model_validate(request(lost)).model_dump(mode="json")
        server.client().set(f"chatqueue:accepted:{lost}",
                            f"pending {request_digest(None, {'request': body})}", ex=60)
        assert client.submit(request(lost)) == lost
        assert server.client().llen(queue) == 2


def test_cancel_of_an_unknown_id_raises_job_not_found(server, monkeypatch, capsys):
    queue = f"idle-{uuid.uuid4().hex[:6]}"
    unknown = f"never-{uuid.uuid4().hex}"
    with client_for(server, queue) as client:
        with pytest.raises(JobNotFound, match=unknown):
            client.cancel(unknown)
        assert not server.client().exists(f"chatqueue:cancelled:{unknown}")
        queued = client.submit(request())
        client.cancel(queued)  # known: no error
        assert server.client().exists(f"chatqueue:cancelled:{queued}")

        monkeypatch.setenv("CHATQUEUE_BROKER_URL", server.url)
        monkeypatch.setenv("CHATQUEUE_QUEUE", queue)
        assert cli_main(["cancel", unknown]) == EXIT_NOT_FOUND
        assert "no such job" in capsys.readouterr().err
        taken = client.submit(request(f"cli-{uuid.uuid4().hex[:8]}"))
        assert cli_main(["submit", "Hello", "--job-id", taken, "--no-wait"]) == EXIT_CONFLICT
        assert taken in capsys.readouterr().err


def test_resubmitting_a_running_then_finished_job_runs_it_once(server, pair):
    queue, workers = pair
    with client_for(server, queue) as client:
        job_id = f"again-{uuid.uuid4().hex[:8]}"
        long_request = request(job_id, max_new_tokens=LONG, ignore_eos=True)
        client.submit(long_request)
        generating(client, job_id)
        assert client.submit(long_request) == job_id  # running: nothing queued
        assert server.client().llen(queue) == 0
        client.cancel(job_id)
        first = client.result(job_id)
        assert first.finish_reason == "cancelled"

        assert client.submit(long_request) == job_id  # finished: nothing queued
        assert server.client().llen(queue) == 0
        with pytest.raises(JobIdConflict):
            client.submit(request(job_id))
        assert client.result(job_id) == first
    # Its "done" line is written before its result is stored, but reaches us through a pipe.
    wait_until(lambda: runs_of(workers, job_id) >= 1, timeout=30, what="the run's done line")
    received = sum(1 for w in workers for line in w.lines if f"[{job_id}] received" in line)
    assert received == 1 and runs_of(workers, job_id) == 1


# ----------------------------------------------------------------------------- the workers


def test_a_second_delivery_waits_for_the_running_one_and_the_stream_has_one_writer(server, pair):
    queue, workers = pair
    raw = plain_publisher(server)
    with client_for(server, queue) as client:
        job_id = f"dup-{uuid.uuid4().hex[:8]}"
        publish_raw(raw, queue, job_id, max_new_tokens=400, ignore_eos=True)
        generating(client, job_id)
        events = read_stream(client, job_id)
        publish_raw(raw, queue, job_id, max_new_tokens=400, ignore_eos=True)  # a duplicate
        wait_until(lambda: any(f"job {job_id} is running under lease" in line
                               for w in workers for line in w.lines),
                   timeout=60, what="the duplicate delivery to wait")
        result = client.result(job_id)
        wait_until(lambda: any(f"job {job_id} already has a final result" in line
                               for w in workers for line in w.lines),
                   timeout=60, what="the duplicate delivery to be skipped")
        wait_until(lambda: events and events[-1].type == "end", timeout=60, what="the end")
        # The runner's "done" line (written before its result was stored) comes through its own
        # pipe, not the one that brought the skip above: wait for it too.
        wait_until(lambda: runs_of(workers, job_id) >= 1, timeout=30, what="the run's done line")
    raw.close()
    assert result.finish_reason == "length" and result.usage.completion_tokens == 400
    assert runs_of(workers, job_id) == 1
    assert [e.type for e in events].count("start") == 1
    assert "".join(e.text for e in events if e.type == "content") == result.content
    assert all(w.process.poll() is None for w in workers)


# ----------------------------------------------------------------------------- revoke


def occupy(client: ChatQueueClient) -> list[str]:
    """Both workers busy with a long job each: the next job waits in the queue."""
    jobs = [client.submit(request(max_new_tokens=LONG, ignore_eos=True)) for _ in range(2)]
    for job_id in jobs:
        generating(client, job_id)
    return jobs


def test_celery_revoke_cancels_queued_and_running_jobs(server, pair):
    queue, _ = pair
    with client_for(server, queue) as client:
        terminated, revoked = occupy(client)
        queued = client.submit(request())

        client.app.control.revoke(queued)
        client.app.control.revoke(terminated, terminate=True)
        client.app.control.revoke(revoked)  # a plain revoke stops a running job too

        for job_id in (terminated, revoked):
            stopped = client.result(job_id, timeout=60)
            assert stopped.finish_reason == "cancelled"
            assert 0 < stopped.usage.completion_tokens < LONG
        never_started = client.result(queued, timeout=60)
        assert never_started.finish_reason == "cancelled"
        assert never_started.usage.completion_tokens == 0
        assert client.result(client.submit(request())).content == TINY_CONTENT  # serving


def test_flower_revoke_and_terminate_buttons_cancel(server, pair, tmp_path):
    queue, _ = pair
    user, password = "operator", uuid.uuid4().hex
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "--broker", server.url, "flower", f"--port={port}",
         "--address=127.0.0.1", f"--basic-auth={user}:{password}"],
        stdout=(tmp_path / "flower.log").open("w"), stderr=subprocess.STDOUT)
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def post(path: str) -> dict[str, object]:
        call = Request(f"http://127.0.0.1:{port}{path}", data=b"", method="POST",
                       headers={"Authorization": auth})
        with urlopen(call, timeout=10) as reply:
            return json.loads(reply.read())

    def answers() -> bool:
        try:
            with urlopen(f"http://127.0.0.1:{port}/healthcheck", timeout=2):
                return True
        except OSError:
            return False

    try:
        wait_until(answers, timeout=60, what="flower")
        with client_for(server, queue) as client:
            running, other = occupy(client)
            queued = client.submit(request())
            assert "Revoked" in str(post(f"/api/task/revoke/{queued}"))
            assert "Revoked" in str(post(f"/api/task/revoke/{running}?terminate=true"))
            stopped = client.result(running, timeout=60)
            assert stopped.finish_reason == "cancelled"
            assert 0 < stopped.usage.completion_tokens < LONG
            never_started = client.result(queued, timeout=60)
            assert never_started.finish_reason == "cancelled"
            assert never_started.usage.completion_tokens == 0
            client.cancel(other)
            client.result(other, timeout=60)
    finally:
        flower.terminate()
        flower.wait(timeout=10)


# ----------------------------------------------------------------------------- last: a kill


def test_a_waiting_delivery_takes_over_when_the_owner_dies(server, pair):
    queue, (owner, heir) = pair
    raw = plain_publisher(server)
    with client_for(server, queue) as client:
        job_id = f"heir-{uuid.uuid4().hex[:8]}"
        publish_raw(raw, queue, job_id, max_new_tokens=200, ignore_eos=True)
        generating(client, job_id)
        running = wait_until(  # logged before it ran, but read through a pipe
            lambda: next((w for w in (owner, heir) if f"[{job_id}] received" in w.log()), None),
            timeout=30, what="the worker that received the job")
        waiting = heir if running is owner else owner
        publish_raw(raw, queue, job_id, max_new_tokens=200, ignore_eos=True)
        wait_until(lambda: f"job {job_id} is running under lease" in waiting.log(),
                   timeout=60, what="the second delivery to wait")

        running.process.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        result = client.result(job_id)
        took = time.monotonic() - killed_at
    raw.close()
    running.process.wait()
    print(f"the waiting delivery ran the job {took:.1f} s after its owner was killed (lease 3 s)")
    assert result.worker_name is not None
    assert result.worker_name.startswith(waiting.name.split("@")[0])
    assert result.usage.completion_tokens == 200
    assert took < 3 + 30  # the lease lapses in 3 s; the rest is the run itself on a busy machine


# ----------------------------------------------------------------------------- the lease itself


def test_a_lease_is_held_renewed_fenced_and_released(server):
    client = server.client()
    keeper = LeaseKeeper(client, ttl_s=1.0, renew_s=0.2, owner="test").start()
    control = JobControl(client, ttl_s=60, stream_maxlen=100)
    job_id = f"lease-{uuid.uuid4().hex[:8]}"
    try:
        lease = keeper.acquire(job_id)
        assert lease is not None and keeper.acquire(job_id) is None
        assert keeper.holder(job_id) == lease.token
        time.sleep(1.5)  # past the TTL: renewed meanwhile
        assert keeper.holder(job_id) == lease.token

        start = [StreamEvent(type="start")]
        assert control.publish(job_id, start, restart=True, lease=lease)
        client.delete(lease_key(job_id))  # lapsed, nobody else took it: the writer takes it back
        assert control.publish(job_id, [StreamEvent(type="content", text="a")], lease=lease)
        assert keeper.holder(job_id) == lease.token

        stopped: list[bool] = []
        lease.on_lost(lambda: stopped.append(True))
        client.set(lease_key(job_id), "another-run", px=60_000)  # another run holds it now
        assert not control.publish(job_id, [StreamEvent(type="content", text="b")], lease=lease)
        wait_until(lambda: stopped, timeout=10, what="the keeper to find the lease lost")
        assert lease.lost.is_set()
        types = [fields[b"type"] for _, fields in client.xrange(stream_key(job_id))]
        assert types == [b"start", b"content"]  # one writer: nothing after the lease went

        keeper.release(lease)
        assert keeper.holder(job_id) == "another-run"  # not ours: left alone
        client.delete(lease_key(job_id))
        mine = keeper.acquire(job_id)
        assert mine is not None
        client.set(accepted_key(job_id), "queued x", ex=5)
        keeper.release(mine, record_key=accepted_key(job_id), record_ttl_s=600)
        assert keeper.holder(job_id) is None
        assert client.ttl(accepted_key(job_id)) > 500  # the record outlives the result
    finally:
        keeper.stop()


def test_claim_skips_a_finished_job_and_gives_up_waiting_when_the_worker_stops(server):
    keeper = LeaseKeeper(server.client(), ttl_s=5.0, renew_s=1.0, owner="test")
    job_id = f"claim-{uuid.uuid4().hex[:8]}"
    assert keeper.claim(job_id, finished=lambda: True, stopping=lambda: False) is None
    assert keeper.holder(job_id) is None  # taken to look, then given back
    other = keeper.acquire(job_id)
    assert other is not None
    with pytest.raises(JobInterrupted):
        keeper.claim(job_id, finished=lambda: False, stopping=lambda: True, poll_s=0.01)
    keeper.release(other)
    lease = keeper.claim(job_id, finished=lambda: False, stopping=lambda: False)
    assert lease is not None and keeper.holder(job_id) == lease.token
