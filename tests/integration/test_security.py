"""Least privilege, tried on real processes (issue 17): a redis-server started on the ACL file
deploy/redis/acl.sh writes, a real `chatqueue-worker run` logged in as the worker user, the
producer as the producer user, the operator's `celery control` as admin, and Celery's event
receiver as Flower's user.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import pytest
import redis as redis_py

from chatqueue_dev.models import TINY_MESSAGES
from producer import ChatQueueClient, JobFailed, ProducerSettings
from producer.celery_app import create_celery
from producer.settings import CANCEL_CHANNEL, TASK_NAME, lease_key
from tests.support.logs import wait_logged
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    free_port,
    redis_server,
    spawn_worker,
    wait_ready,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration

ROLES = ("admin", "producer", "worker", "flower")
LONG = 3000  # tokens: a job that runs until it is cancelled


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {role: f"{role}-{uuid.uuid4().hex}" for role in ROLES}


@pytest.fixture(scope="module")
def acl_redis(passwords: dict[str, str]) -> Iterator[RedisServer]:
    env = {"PATH": os.environ["PATH"],
           **{f"REDIS_{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}}
    acl = subprocess.run(["sh", str(REPO_ROOT / "deploy" / "redis" / "acl.sh")], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    with redis_server(acl=acl, username="admin", password=passwords["admin"]) as server:
        yield server


def login(server: RedisServer, passwords: dict[str, str], role: str) -> redis_py.Redis:
    return redis_py.Redis(host="127.0.0.1", port=server.port, username=role,
                          password=passwords[role])


def settings_for(server: RedisServer, passwords: dict[str, str], role: str,
                 queue: str) -> ProducerSettings:
    return ProducerSettings(broker_url=server.url, redis_username=role,
                            redis_password=passwords[role], queue=queue, wait_timeout_s=120)


@pytest.fixture(scope="module")
def serving(acl_redis: RedisServer, passwords: dict[str, str], tiny_model_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One worker on the worker user's credentials, with its metrics port (health check)."""
    queue, port = f"chatqueue.security-{uuid.uuid4().hex[:6]}", free_port()
    env = worker_env(acl_redis.url, tiny_model_dir, queue, redis_username="worker",
                     redis_password=passwords["worker"], concurrency="2",
                     default_max_new_tokens="32", max_new_tokens_cap=str(LONG),
                     metrics_port=str(port))
    worker = spawn_worker(env, tmp_path_factory.mktemp("security-logs"))
    try:
        wait_ready(worker)
        yield {"queue": queue, "worker": worker, "url": f"http://127.0.0.1:{port}/metrics"}
    finally:
        worker.stop()


@pytest.fixture()
def producer(acl_redis, passwords, serving) -> Iterator[ChatQueueClient]:
    with ChatQueueClient(settings_for(acl_redis, passwords, "producer", serving["queue"])) as c:
        yield c


@pytest.fixture()
def admin_app(acl_redis, passwords, serving) -> Iterator[Any]:
    app = create_celery(settings_for(acl_redis, passwords, "admin", serving["queue"]),
                        name="chatqueue-admin")
    yield app
    app.close()


def refused(call: Any, *args: Any) -> str:
    with pytest.raises(redis_py.exceptions.NoPermissionError) as caught:
        call(*args)
    return str(caught.value)


def running(client: ChatQueueClient, job_id: str) -> None:
    wait_until(lambda: client.progress(job_id) is not None, timeout=60,
               what=f"job {job_id} to run")


def health(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", "health", "--url", url],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)


# ----------------------------------------------------------------------------- refused


def test_producer_credentials_cannot_flush_configure_control_or_read_worker_keys(
    acl_redis, passwords, serving, producer, admin_app
):
    queue = serving["queue"]
    admin = acl_redis.client()
    admin.set(lease_key("someone-elses-job"), "worker-token")
    as_producer = login(acl_redis, passwords, "producer")
    assert as_producer.ping()

    refused(as_producer.flushall)
    refused(as_producer.flushdb)
    refused(as_producer.config_set, "maxmemory-policy", "allkeys-lru")
    refused(as_producer.config_get, "*")
    refused(as_producer.keys, "*")
    refused(as_producer.acl_list)
    refused(as_producer.execute_command, "SHUTDOWN", "NOSAVE")
    refused(as_producer.execute_command, "SCRIPT", "FLUSH")
    refused(as_producer.get, lease_key("someone-elses-job"))  # a worker's key
    refused(as_producer.hgetall, "unacked")  # messages workers hold
    refused(as_producer.delete, queue)  # jobs queued by others
    refused(as_producer.set, "celery-task-meta-forged", "{}")  # a forged result
    refused(as_producer.publish, "celery-task-meta-forged", "{}")
    refused(as_producer.publish, "/0.celery.pidbox", "{}")  # Celery's control channel
    refused(as_producer.eval, "return redis.call('FLUSHALL')", 0)
    # Through Celery itself: the broadcast that made a worker exit is refused at the publish.
    with pytest.raises(Exception, match=r"(?i)no ?perm|permissions"):
        producer.app.control.broadcast("shutdown")
    with pytest.raises(Exception, match=r"(?i)no ?perm|permissions"):
        producer.app.control.cancel_consumer(queue)
    # What it may do it does: queue a job, get its result.
    assert producer.result(producer.submit({"messages": TINY_MESSAGES})).content
    assert serving["worker"].process.poll() is None
    assert health(serving["url"]).returncode == 0
    assert admin.get(lease_key("someone-elses-job")) == b"worker-token"
    # Redis's default user is off: a password alone logs in as nobody.
    with pytest.raises(redis_py.exceptions.AuthenticationError):
        redis_py.Redis(host="127.0.0.1", port=acl_redis.port,
                       password=passwords["admin"]).ping()


def test_producer_batch_rights_stop_at_what_batches_need(acl_redis, passwords):
    """The gateway's batches (issue 16) run on the producer login (tested end to end below):
    its batch rules reach chatqueue:batch:* and the chatqueue:batches index with the commands
    producer/batches.py sends, and nothing else of them: no deleting a batch or its lines, no
    hash or counter writes on other keys, no forged live worker, stream or shortened job record,
    no script but the ones it loads."""
    as_producer = login(acl_redis, passwords, "producer")
    batch = f"chatqueue:batch:batch_{uuid.uuid4().hex}"
    assert as_producer.hsetnx(batch, "id", "x") and as_producer.hincrby(batch, "failed", 1)
    assert as_producer.zadd("chatqueue:batches", {"batch_x": 1.0}) == 1
    assert as_producer.expire(batch, 60) and as_producer.hgetall(batch)
    job = uuid.uuid4().hex
    refused(as_producer.delete, batch)
    refused(as_producer.zrem, "chatqueue:batches", "batch_x")
    refused(as_producer.lpush, batch, "x")
    refused(as_producer.hset, f"chatqueue:accepted:{job}", "state", "x")
    refused(as_producer.hincrby, lease_key(job), "n", 1)
    refused(as_producer.expire, f"chatqueue:accepted:{job}", 1)  # shorten a job record
    refused(as_producer.zadd, "chatqueue:workers", {"forged worker": 4e9})
    refused(as_producer.xadd, f"chatqueue:stream:{job}", {"type": "content", "text": "forged"})
    refused(as_producer.hset, "unacked", job, "{}")
    refused(as_producer.execute_command, "EVAL", "return 1", 0)
    refused(as_producer.execute_command, "FUNCTION", "LIST")


def test_worker_and_flower_credentials_are_refused_what_their_role_does_not_need(
    acl_redis, passwords, serving
):
    for role in ("worker", "flower"):
        client = login(acl_redis, passwords, role)
        refused(client.flushall)
        refused(client.config_set, "maxmemory-policy", "allkeys-lru")
        refused(client.keys, "*")
        refused(client.publish, "/0.celery.pidbox", "{}")
    as_flower = login(acl_redis, passwords, "flower")
    refused(as_flower.lpush, serving["queue"], "{}")  # Flower's send-task
    refused(as_flower.get, "celery-task-meta-anything")  # results hold generated text
    refused(as_flower.publish, CANCEL_CHANNEL, "anything")
    assert as_flower.llen(serving["queue"]) == 0  # its queue view still works


# ----------------------------------------------------------------------------- jobs flow


def test_jobs_stream_and_cancel_with_role_credentials_and_admin_revoke_is_our_cancel(
    serving, producer, admin_app
):
    done = producer.submit({"messages": TINY_MESSAGES})
    events = list(producer.stream(done, timeout=60))
    result = producer.result(done)
    assert result.content
    assert "".join(e.text for e in events if e.type == "content") == result.content

    long = {"messages": TINY_MESSAGES, "params": {"max_new_tokens": LONG, "ignore_eos": True}}
    cancelled = producer.submit(long)
    running(producer, cancelled)
    producer.cancel(cancelled)
    assert producer.result(cancelled).finish_reason == "cancelled"

    # The operator's revoke (a broadcast on the control channel) still maps onto our cancel.
    revoked = producer.submit(long)
    running(producer, revoked)
    replies = admin_app.control.revoke(revoked, reply=True, timeout=5)
    assert replies and "cancelled" in str(replies)
    assert producer.result(revoked).finish_reason == "cancelled"


# ----------------------------------------------------------------------------- health


def test_health_fails_while_the_worker_does_not_consume_its_queue(serving, producer, admin_app):
    url, queue = serving["url"], serving["queue"]
    assert health(url).returncode == 0

    admin_app.control.cancel_consumer(queue, reply=True, timeout=5)
    stopped = health(url)
    assert stopped.returncode == 1 and "not consuming" in stopped.stderr
    queued = producer.submit({"messages": TINY_MESSAGES})
    time.sleep(1.0)
    assert producer.state(queued) == "PENDING"  # nobody takes it: the health check was right

    admin_app.control.add_consumer(queue, reply=True, timeout=5)
    wait_until(lambda: health(url).returncode == 0, timeout=30, what="healthy again")
    assert producer.result(queued).content


# ----------------------------------------------------------------------------- smaller holes


def test_cancel_listener_survives_a_message_that_is_not_utf8(serving, producer):
    as_producer = producer._redis
    as_producer.publish(CANCEL_CHANNEL, b"\xff\xfe\x80not utf-8")
    as_producer.publish(CANCEL_CHANNEL, "forged\nINFO line")
    job = producer.submit({"messages": TINY_MESSAGES,
                           "params": {"max_new_tokens": LONG, "ignore_eos": True}})
    running(producer, job)
    producer.cancel(job)
    assert producer.result(job).finish_reason == "cancelled"
    assert not any(line.startswith("INFO line") for line in serving["worker"].lines)


def test_worker_runs_only_chatqueue_tasks_and_refuses_forged_job_ids(
    acl_redis, serving, producer
):
    queue, worker = serving["queue"], serving["worker"]
    builtin = producer.app.send_task("celery.accumulate", args=[1, 2], queue=queue)
    with pytest.raises(Exception) as caught:
        builtin.get(timeout=30, propagate=True)
    assert type(caught.value).__name__ == "NotRegistered"
    # Celery logs it before it stores the failure, but the log comes through a pipe.
    wait_logged(worker, "Received unregistered task of type 'celery.accumulate'")

    forged = "job\n2026-12-01 00:00:00,000 INFO forged: admin logged in"
    producer.app.send_task(TASK_NAME, kwargs={"request": {"messages": TINY_MESSAGES}},
                           task_id=forged, queue=queue)
    wait_until(lambda: "is not a valid job id" in worker.log(), timeout=30,
               what="the forged job id refused")
    assert not any("INFO forged" in line and not line.startswith(" ") and "job\\n" not in line
                   for line in worker.lines)
    assert all(not line.startswith("2026-12-01 00:00:00") for line in worker.lines)
    # Both were acknowledged, not left for redelivery: nothing queued or unacknowledged.
    admin = acl_redis.client()
    wait_until(lambda: admin.llen(queue) == 0 and admin.hlen("unacked") == 0, timeout=30,
               what="the dropped messages acknowledged")
    assert producer.result(producer.submit({"messages": TINY_MESSAGES})).content


# ----------------------------------------------------------------------------- no content


def _events_as_flower(server: RedisServer, passwords: dict[str, str], queue: str,
                      seen: list[dict[str, Any]], ready: threading.Event,
                      stop: threading.Event) -> None:
    """What Flower sees: Celery's event receiver, logged in as Flower's Redis user."""
    app = create_celery(settings_for(server, passwords, "flower", queue), name="flower-view")
    with app.connection_for_read() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": seen.append})
        ready.set()
        while not stop.is_set():
            try:
                receiver.capture(limit=None, timeout=1.0, wakeup=False)
            except TimeoutError:  # a second without events
                continue


def send_event_until_heard(server: RedisServer, passwords: dict[str, str], queue: str,
                           heard: Callable[[], bool], event_type: str, every_s: float = 0.2,
                           **fields: Any) -> None:
    """Send an event as the operator until `heard()` says an event receiver got it: then it
    hears events. Sent again every `every_s`: one sent before it subscribed is heard by nobody."""
    app = create_celery(settings_for(server, passwords, "admin", queue), name="event-probe")
    last_sent_at = -1.0
    try:
        with app.connection_for_write() as connection:
            dispatcher = app.events.Dispatcher(connection)

            def sent_and_heard() -> bool:
                nonlocal last_sent_at
                if time.monotonic() - last_sent_at >= every_s:
                    dispatcher.send(event_type, **fields)
                    last_sent_at = time.monotonic()
                return heard()

            wait_until(sent_and_heard, timeout=30, what="the event receiver to subscribe")
    finally:
        app.close()


@pytest.mark.parametrize(("level", "log_content"), [
    pytest.param("INFO", False, id="info"),
    pytest.param("DEBUG", False, id="debug"),
    # The debug setting lets content through: the checks below do see it when it is there.
    pytest.param("DEBUG", True, id="debug-with-log-content"),
])
def test_no_prompt_or_generated_text_in_logs_or_events(
    acl_redis, passwords, tiny_model_dir, tmp_path, level, log_content
):
    marker = f"SECRET-MARKER-{uuid.uuid4().hex[:8]}"
    queue = f"chatqueue.redact-{uuid.uuid4().hex[:6]}"
    env = worker_env(acl_redis.url, tiny_model_dir, queue, redis_username="worker",
                     redis_password=passwords["worker"], log_level=level,
                     default_max_new_tokens="32", log_content=str(log_content).lower())
    worker = spawn_worker(env, tmp_path)
    seen: list[dict[str, Any]] = []
    ready, stop = threading.Event(), threading.Event()
    listener = threading.Thread(target=_events_as_flower, daemon=True,
                                args=(acl_redis, passwords, queue, seen, ready, stop))
    try:
        wait_ready(worker)
        listener.start()
        assert ready.wait(30)
        send_event_until_heard(
            acl_redis, passwords, queue, event_type="chatqueue-test-probe",
            heard=lambda: any(e.get("type") == "chatqueue-test-probe" for e in seen))
        messages = [{"role": "system", "content": f"Keep this secret: {marker}"}, *TINY_MESSAGES]
        with ChatQueueClient(settings_for(acl_redis, passwords, "producer", queue)) as client:
            result = client.result(client.submit({"messages": messages}))
            # A request the worker refuses, its error quoting the value given: the marker.
            bad = client.app.send_task(
                TASK_NAME, kwargs={"request": {"messages": [{"role": marker, "content": "x"}]}},
                queue=queue).id
            with pytest.raises(JobFailed) as failed:
                client.result(bad)
        assert marker in str(failed.value)  # the caller's own error still says what was wrong
        wait_until(lambda: sum(e.get("type") in ("task-succeeded", "task-failed")
                               for e in seen) >= 2, timeout=30, what="the task events")
    finally:
        stop.set()
        worker.stop()

    generated = [text for text in (result.content, result.thinking) if len(text) >= 12]
    assert generated, "the tiny model generated no text to look for"
    # The lines that used to carry content (written before the worker stopped; read through a
    # pipe that may still hold them when it has).
    log = wait_logged(worker, "succeeded in", "failed")
    events = repr(seen)
    if log_content:
        # Shown as Celery's repr (newlines escaped, long values cut): look for a plain piece.
        assert marker in log
        pieces = [max(text.split("\n"), key=len)[:12] for text in generated]
        assert all(piece in log and piece in events for piece in pieces)
        return
    for secret in (marker, *generated):
        assert secret not in log, f"{secret!r} in the {level} log"
        assert secret not in events, f"{secret!r} in the task events Flower shows"


# ----------------------------------------------------------------------------- Flower


def test_flower_on_its_own_login_is_a_view_that_cannot_change_the_fleet(
    acl_redis, passwords, serving, producer, admin_app, tmp_path
):
    """A real Flower as compose runs it: the flower Redis user in CELERY_BROKER_URL (not argv),
    basic auth, FLOWER_ENABLE_EVENTS off, deploy/flower/flowerconfig.py. Its dashboard and
    task list work; its control and send-task endpoints fail, and the worker serves on; the
    task list carries no content."""
    queue, worker = serving["queue"], serving["worker"]
    (hostname,) = admin_app.control.inspect(timeout=5).ping()
    user, password, port = "operator", uuid.uuid4().hex, free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("CHATQUEUE_")}
    env.update({
        "CELERY_BROKER_URL":
            f"redis://flower:{passwords['flower']}@127.0.0.1:{acl_redis.port}/0",
        "FLOWER_BASIC_AUTH": f"{user}:{password}", "FLOWER_ENABLE_EVENTS": "false",
        "FLOWER_PORT": str(port), "FLOWER_ADDRESS": "127.0.0.1",
        "FLOWER_CONF": str(REPO_ROOT / "deploy" / "flower" / "flowerconfig.py"),
    })
    flower = subprocess.Popen([sys.executable, "-m", "celery", "flower"], env=env,
                              stdout=(tmp_path / "flower.log").open("w"),
                              stderr=subprocess.STDOUT)
    auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def call(path: str, method: str = "GET") -> tuple[int, str]:
        request = Request(f"http://127.0.0.1:{port}{path}", method=method, headers=auth,
                          data=b"{}" if method == "POST" else None)
        try:
            with urlopen(request, timeout=30) as reply:
                return reply.status, reply.read().decode()
        except HTTPError as error:
            return error.code, error.read().decode()
        except OSError as error:
            return 0, str(error)

    marker = f"FLOWER-MARKER-{uuid.uuid4().hex[:8]}"
    try:
        wait_until(lambda: call("/healthcheck")[0] == 200, timeout=60, what="flower")
        # Its event receiver subscribes: wait until a task event (a probe's) reaches its list.
        probe = f"probe-{uuid.uuid4().hex[:8]}"
        send_event_until_heard(acl_redis, passwords, queue, event_type="task-received",
                               every_s=1.0, heard=lambda: probe in call("/api/tasks")[1],
                               uuid=probe, name="chatqueue.test-probe")
        job = producer.submit({"messages": [{"role": "system", "content": marker},
                                            *TINY_MESSAGES]})
        result = producer.result(job)
        assert call("/")[0] == 200
        wait_until(lambda: job in call("/api/tasks")[1], timeout=30, what="the task in Flower")
        tasks = call("/api/tasks")[1]
        assert marker not in tasks and result.content not in tasks

        # Flower's inspect calls are refused, so it knows no worker by name (404 for the worker
        # buttons); what does publish -- revoke, send-task -- is refused by Redis.
        for path in (f"/api/task/revoke/{job}", f"/api/worker/shutdown/{hostname}",
                     f"/api/worker/queue/cancel-consumer/{hostname}?queue={queue}",
                     f"/api/worker/pool/restart/{hostname}",
                     f"/api/task/rate-limit/{hostname}?taskname=x&ratelimit=1",
                     "/api/task/send-task/chatqueue.generate_chat"):
            status, body = call(path, "POST")
            assert status != 200 or "fail" in body.lower(), (path, status, body)
        assert acl_redis.client().llen(queue) == 0  # send-task queued nothing
        time.sleep(1.0)
        assert worker.process.poll() is None
        assert health(serving["url"]).returncode == 0
        assert producer.result(producer.submit({"messages": TINY_MESSAGES})).content
        assert flower.poll() is None
    finally:
        flower.terminate()
        flower.wait(timeout=10)


# ----------------------------------------------------------------------------- redelivery


def test_a_killed_workers_job_is_restored_and_runs_on_another_with_the_worker_login(
    acl_redis, passwords, tiny_model_dir, tmp_path
):
    """kombu's restore of a dead worker's unacknowledged job (its mutex, the unacked hash and
    index, the push back) and the job lease all work within the worker user's rules: nothing
    the workers do is refused (ACL LOG stays empty)."""
    admin = acl_redis.client()
    admin.execute_command("ACL", "LOG", "RESET")
    queue = f"chatqueue.restore-{uuid.uuid4().hex[:6]}"
    fast = {"max_job_seconds": "5", "visibility_timeout_s": "8", "redelivery_check_s": "1",
            "job_lease_ttl_s": "3", "job_lease_renew_s": "1", "concurrency": "1"}
    env = worker_env(acl_redis.url, tiny_model_dir, queue, redis_username="worker",
                     redis_password=passwords["worker"], **fast)
    workers = [spawn_worker(env, tmp_path) for _ in range(2)]
    try:
        for worker in workers:
            wait_ready(worker)
        with ChatQueueClient(settings_for(acl_redis, passwords, "producer", queue)) as client:
            job = client.submit({"messages": TINY_MESSAGES,
                                 "params": {"max_new_tokens": 100, "ignore_eos": True}})
            victim = wait_until(
                lambda: next((w for w in workers if job in w.log() and "received" in w.log()),
                             None), timeout=60, what="a worker to take the job")
            running(client, job)
            victim.process.kill()
            try:
                result = client.result(job, timeout=60)
            except TimeoutError:
                denied = admin.acl_log(count=100)
                raise AssertionError(f"not restored; ACL LOG: {denied}; "
                                     f"{[w.log()[-3000:] for w in workers]}") from None
        survivor = next(w for w in workers if w is not victim)
        assert result.worker_name is not None
        assert result.worker_name.split("@")[0] == survivor.name.split("@")[0]
        assert result.usage.completion_tokens > 0
    finally:
        for worker in workers:
            worker.stop()
    denied = [(e.get("username"), e.get("object"), e.get("reason"))
              for e in admin.acl_log(count=100)]
    assert not denied, f"refused by the ACL: {denied}"


# ----------------------------------------------------------------------------- one database


def test_every_key_chatqueue_writes_lives_in_its_database_and_batches_run_on_the_producer_login(
    tiny_model_dir, tmp_path
):
    """chatqueue's database is the one its URLs name (compose: CHATQUEUE_REDIS_DB): a worker, a
    producer, the gateway's batch endpoints and the operator's `celery control` on acl.sh's
    users for database 7 write nothing anywhere else, Celery's fanout channels carry the
    database number, and Redis refuses none of it (ACL LOG stays empty): in particular the
    gateway's Files and Batch endpoints work on the producer login."""
    import asyncio

    import httpx

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    db = 7
    passwords = {role: f"{role}-{uuid.uuid4().hex}" for role in ROLES}
    env = {"PATH": os.environ["PATH"], "CHATQUEUE_REDIS_DB": str(db),
           **{f"REDIS_{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}}
    acl = subprocess.run(["sh", str(REPO_ROOT / "deploy" / "redis" / "acl.sh")], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    assert f"&/{db}.celery.pidbox" in acl
    queue = f"chatqueue.db-{uuid.uuid4().hex[:6]}"
    with redis_server(acl=acl, username="admin", password=passwords["admin"]) as server:
        url = server.url.removesuffix("/0") + f"/{db}"
        admin = server.client()
        seen_channels: set[bytes] = set()
        monitor_stop = threading.Event()

        def watch_channels() -> None:  # every channel published to, whatever its database
            pubsub = redis_py.Redis(host="127.0.0.1", port=server.port, username="admin",
                                    password=passwords["admin"]).pubsub()
            pubsub.psubscribe("*")
            while not monitor_stop.is_set():
                message = pubsub.get_message(timeout=0.2)
                if message and message["type"] == "pmessage":
                    seen_channels.add(message["channel"])
            pubsub.close()

        watcher = threading.Thread(target=watch_channels, daemon=True)
        watcher.start()
        worker = spawn_worker(worker_env(url, tiny_model_dir, queue, redis_username="worker",
                                         redis_password=passwords["worker"],
                                         default_max_new_tokens="16",
                                         max_new_tokens_cap=str(LONG)), tmp_path)
        try:
            wait_ready(worker)
            settings = ProducerSettings(broker_url=url, redis_username="producer",
                                        redis_password=passwords["producer"], queue=queue,
                                        wait_timeout_s=120)
            with ChatQueueClient(settings) as producer:
                job = producer.submit({"messages": TINY_MESSAGES})
                assert list(producer.stream(job, timeout=60))
                assert producer.result(job).content
                long = producer.submit({"messages": TINY_MESSAGES, "params": {
                    "max_new_tokens": LONG, "ignore_eos": True}})
                running(producer, long)
                producer.cancel(long)
                assert producer.result(long).finish_reason == "cancelled"

            control = create_celery(ProducerSettings(
                broker_url=url, redis_username="admin", redis_password=passwords["admin"],
                queue=queue), name="chatqueue-admin")
            assert control.control.inspect(timeout=5).ping()
            control.close()

            source = tmp_path / "requests.jsonl"
            source.write_text("".join(
                json_line(custom_id, {"messages": TINY_MESSAGES, "max_tokens": 8})
                for custom_id in ("a", "b")) + json_line("bad", {"messages": TINY_MESSAGES,
                                                                 "max_tokens": 0}))
            app = create_app(GatewaySettings(files_dir=tmp_path / "files"), settings,
                             key_digests=())

            async def batch_through_the_gateway() -> tuple[dict[str, Any], str, str]:
                async with app.app.state.gateway.lifespan(app.app), httpx.AsyncClient(
                        transport=httpx.ASGITransport(app=app), base_url="http://gw",
                        timeout=60) as http:
                    uploaded = await http.post("/v1/files", data={"purpose": "batch"},
                                               files={"file": source.open("rb")})
                    assert uploaded.status_code == 200, uploaded.text
                    created = await http.post("/v1/batches", json={
                        "input_file_id": uploaded.json()["id"],
                        "endpoint": "/v1/chat/completions", "completion_window": "1h"})
                    assert created.status_code == 200, created.text
                    batch_id = created.json()["id"]
                    deadline = time.monotonic() + 120
                    while True:
                        batch = (await http.get(f"/v1/batches/{batch_id}")).json()
                        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                            break
                        assert time.monotonic() < deadline, batch
                        await asyncio.sleep(0.25)
                    listed = (await http.get("/v1/batches")).json()
                    assert batch_id in [b["id"] for b in listed["data"]]
                    output = await http.get(f"/v1/files/{batch['output_file_id']}/content")
                    errors = await http.get(f"/v1/files/{batch['error_file_id']}/content")
                    cancelled = await http.post(f"/v1/batches/{batch_id}/cancel")
                    assert cancelled.status_code == 200, cancelled.text
                    return batch, output.text, errors.text

            batch, output, errors = asyncio.run(batch_through_the_gateway())
        finally:
            worker.stop()
            monitor_stop.set()
            watcher.join(timeout=5)
        denied = [(e.get("username"), e.get("object"), e.get("reason"))
                  for e in admin.acl_log(count=100)]
        keyspace = admin.info("keyspace")
        in_db = redis_py.Redis(host="127.0.0.1", port=server.port, db=db, username="admin",
                               password=passwords["admin"])
        ours = {key.decode() for key in in_db.scan_iter(count=1000)}

    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert sorted(json.loads(x)["custom_id"] for x in output.splitlines()) == ["a", "b"]
    assert [json.loads(x)["custom_id"] for x in errors.splitlines()] == ["bad"]
    assert not denied, f"refused by the ACL: {denied}"
    assert set(keyspace) == {f"db{db}"}, keyspace  # nothing in any other database
    kinds = {"celery-task-meta-", "chatqueue:accepted:", "chatqueue:stream:",
             "chatqueue:cancelled:", "chatqueue:batch:", "chatqueue:batches", "chatqueue:workers",
             "_kombu.binding."}
    assert {kind for kind in kinds if any(key.startswith(kind) for key in ours)} == kinds, ours
    # Celery's control and event channels are per database; the rest are named chatqueue's own
    # or after a job id (pub/sub in Redis spans every database).
    channels = {channel.decode() for channel in seen_channels}
    assert any(c.startswith(f"/{db}.celeryev/") for c in channels), channels
    assert f"/{db}.celery.pidbox" in channels, channels
    assert all(c.startswith((f"/{db}.", "chatqueue:", "celery-task-meta-")) for c in channels), \
        channels


def json_line(custom_id: str, body: dict[str, Any]) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": body}) + "\n"
