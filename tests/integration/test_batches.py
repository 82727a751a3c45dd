"""Batches and stop strings end to end: a Batch JSONL file -> real Redis -> real workers on the
tiny model -> output and error JSONL; priorities; resuming a killed submission; cancel and
expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES, TINY_THINKING
from producer import ChatQueueClient, JobFailed, ProducerSettings
from producer.batches import BatchClient, batch_lines_key, line_job_id
from producer.celery_app import PRIORITY_STEPS
from producer.settings import accepted_key, lease_key
from tests.support.servers import (
    REPO_ROOT,
    RedisServer,
    WorkerProcess,
    redis_server,
    spawn_worker,
    wait_ready,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration

GREEDY = {"do_sample": False}


def line(custom_id: str, **body: object) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST",
                       "url": "/v1/chat/completions",
                       "body": {"messages": TINY_MESSAGES, "temperature": 0, **body}})


def write_file(tmp_path: Path, lines: list[str], name: str = "in.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def idle_client(redis):
    """A client whose queue no worker consumes: what it submits stays queued."""
    with ChatQueueClient(ProducerSettings(broker_url=redis.url,
                                          queue=f"idle-{uuid.uuid4().hex[:6]}",
                                          wait_timeout_s=30)) as client:
        yield client


def queued(client: ChatQueueClient) -> int:
    """Messages waiting in the client's queue, over all its priority lists."""
    queue = client.settings.queue
    keys = [queue] + [f"{queue}\x06\x16{p}" for p in PRIORITY_STEPS[1:]]
    return sum(client._redis.llen(key) for key in keys)


# --- stop strings, on every job


def test_stop_string_ends_the_answer_in_the_result_and_the_stream(tiny_client):
    plain = tiny_client.result(tiny_client.submit(
        {"messages": TINY_MESSAGES, "params": GREEDY}))
    job_id = tiny_client.submit({"messages": TINY_MESSAGES,
                                 "params": {**GREEDY, "stop": [" tiny", "zzz"]}})
    streamed = {"thinking": "", "content": ""}
    for event in tiny_client.stream(job_id):
        if event.type in streamed:
            streamed[event.type] += event.text
    result = tiny_client.result(job_id)

    cut = TINY_CONTENT[:TINY_CONTENT.index(" tiny")]
    assert (result.content, result.finish_reason) == (cut, "stop")
    assert result.thinking == TINY_THINKING  # the thinking is not searched
    assert streamed == {"thinking": TINY_THINKING, "content": cut}
    assert result.usage.completion_tokens < plain.usage.completion_tokens  # it stopped early


def test_a_stop_string_in_the_thinking_only_does_not_stop(tiny_client):
    result = tiny_client.result(tiny_client.submit(
        {"messages": TINY_MESSAGES, "params": {**GREEDY, "stop": ["greets"]}}))
    assert (result.thinking, result.content) == (TINY_THINKING, TINY_CONTENT)


# --- priorities


def test_an_interactive_job_is_taken_before_a_backlog_of_batch_lines(
        redis, start_worker, tiny_model_dir, tmp_path):
    queue = f"prio-{uuid.uuid4().hex[:6]}"
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue,
                                          wait_timeout_s=120)) as client:
        batches = BatchClient(client)
        backlog = batches.submit(write_file(tmp_path, [line(f"b{i}", max_tokens=8)
                                                       for i in range(1000)]))
        low = client.submit({"messages": TINY_MESSAGES, "priority": 0,
                             "params": {**GREEDY, "max_new_tokens": 4}})
        urgent = client.submit({"messages": TINY_MESSAGES,
                                "params": {**GREEDY, "max_new_tokens": 4}})
        # The worker starts once all of it is queued, and takes one job at a time.
        start_worker(tiny_model_dir, queue, concurrency="1", max_batch_size="1")
        urgent_started = client.result(urgent).timings.started_at
        batches.cancel(backlog.batch_id)  # the rest of the backlog ends without running
        assert batches.wait(backlog.batch_id, timeout=120)["status"] == "cancelled"
        assert client.result(low).timings.started_at > urgent_started
        ahead = 0  # batch lines (taken in file order) that started before the urgent job
        for i in range(20):
            try:
                result = client.fetch(line_job_id(backlog.batch_id, f"b{i}"))
            except JobFailed:  # cancelled before it started
                continue
            ahead += result is not None and result.timings.started_at < urgent_started
    # It waited for a task slot, not for the backlog: at most a line already prefetched.
    assert ahead <= 1


# --- batches


def test_a_file_of_valid_and_invalid_lines_gives_one_line_each(tiny_client, tmp_path):
    lines = [
        line("ok-1", max_completion_tokens=64),
        line("ok-stop", stop=" tiny"),
        json.dumps({"custom_id": "parts", "body": {"temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "text", "text": TINY_MESSAGES[-1]["content"]}]}
        ]}}),
        line("no-think", chat_template_kwargs={"enable_thinking": False}, max_tokens=32),
        line("n2", n=2),
        line("tools", tools=[{"type": "function", "function": {"name": "f"}}]),
        line("too-long", max_completion_tokens=100_000),  # over the worker's cap: its 400
        "{not json",
        line("ok-1"),  # a custom_id used twice: the second line fails
    ]
    batches = BatchClient(tiny_client)
    report = batches.submit(write_file(tmp_path, lines), window="1h",
                            metadata={"purpose": "test"})
    assert (report.lines, report.refused) == (9, 4)
    batch = batches.wait(report.batch_id, timeout=120)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 9, "completed": 4, "failed": 5}
    assert batch["metadata"] == {"purpose": "test"}
    assert batch["completed_at"] >= batch["in_progress_at"] >= batch["created_at"]

    results = list(batches.results(report.batch_id))
    outputs = {line["custom_id"]: line for kind, line in results if kind == "output"}
    errors = [line for kind, line in results if kind == "error"]
    assert set(outputs) == {"ok-1", "ok-stop", "parts", "no-think"}
    assert sorted(str(e["custom_id"]) for e in errors) == [
        "None", "n2", "ok-1", "too-long", "tools"]
    for output in outputs.values():
        completion = ChatCompletion.model_validate(output["response"]["body"])
        assert completion.choices[0].message.content
    first = outputs["ok-1"]["response"]["body"]
    assert first["choices"][0]["message"]["content"] == TINY_CONTENT
    assert first["choices"][0]["message"]["reasoning_content"] == TINY_THINKING
    assert first["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    stopped = outputs["ok-stop"]["response"]["body"]["choices"][0]
    assert stopped["message"]["content"] == TINY_CONTENT[:TINY_CONTENT.index(" tiny")]
    assert stopped["finish_reason"] == "stop"
    params = {e["custom_id"]: e["response"]["body"]["error"]["param"] for e in errors}
    assert params["n2"] == "n" and params["tools"] == "tools"
    assert params["too-long"] == "max_completion_tokens"
    assert all(e["response"]["status_code"] == 400 for e in errors)


def test_a_line_over_the_byte_limit_is_an_error_line_and_never_published(
        redis, tiny_queue, tmp_path):
    limit = 4_096
    settings = ProducerSettings(broker_url=redis.url, queue=tiny_queue, wait_timeout_s=120,
                                max_request_bytes=limit)
    big = json.dumps({"custom_id": "big", "body": {
        "messages": [{"role": "user", "content": "x" * 10_000}]}})
    with ChatQueueClient(settings) as client:
        batches = BatchClient(client)
        report = batches.submit(write_file(tmp_path, [line("ok", max_tokens=8), big]))
        assert (report.lines, report.refused) == (2, 1)
        batch = batches.wait(report.batch_id, timeout=120)
        assert batch["status"] == "completed"  # the batch runs; only that line fails
        assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
        results = list(batches.results(report.batch_id))
        assert [(kind, r["custom_id"]) for kind, r in results] == [
            ("output", "ok"), ("error", "big")]
        error = results[1][1]["response"]["body"]["error"]
        assert (error["param"], error["code"]) == ("body", "limit_exceeded")
        assert str(limit) in error["message"] and "bytes" in error["message"]
        assert client._redis.get(accepted_key(line_job_id(report.batch_id, "big"))) is None


@pytest.mark.parametrize(("first_limit", "resumed_limit"), [
    pytest.param(1_048_576, 2_048, id="lowered: a published line is not refused"),
    pytest.param(2_048, 1_048_576, id="raised: a refused line is not published"),
])
def test_a_resumed_submission_keeps_the_byte_limit_of_the_first(
        idle_client, redis, tmp_path, first_limit, resumed_limit):
    """max_request_bytes changed between a batch's submission and its resume: each line keeps
    the one outcome it got at submission, never both queued and refused."""
    path = write_file(tmp_path, [line("small", max_tokens=4),
                                 line("mid", max_tokens=4, user="x" * 3_000)])

    def batches_with(limit: int) -> tuple[ChatQueueClient, BatchClient]:
        client = ChatQueueClient(ProducerSettings(
            broker_url=redis.url, queue=idle_client.settings.queue, max_request_bytes=limit))
        return client, BatchClient(client)

    batch_id = f"batch_limit_{uuid.uuid4().hex[:8]}"
    first_client, first = batches_with(first_limit)
    with first_client:
        report = first.submit(path, batch_id=batch_id)
    mid_refused = first_limit < resumed_limit
    assert (report.lines, report.refused) == (2, int(mid_refused))
    before = first.status(report.batch_id)["request_counts"]
    queued_before = queued(idle_client)
    assert queued_before == 2 - int(mid_refused)

    resumed_client, resumed = batches_with(resumed_limit)
    with resumed_client:
        again = resumed.submit(path, batch_id=batch_id)
        assert not again.created and (again.lines, again.refused) == (2, report.refused)
        assert resumed.status(report.batch_id)["request_counts"] == before
        errors = [r["custom_id"] for kind, r in resumed.results(report.batch_id)
                  if kind == "error"]
    assert errors == (["mid"] if mid_refused else [])
    assert queued(idle_client) == queued_before
    accepted = idle_client._redis.get(accepted_key(line_job_id(report.batch_id, "mid")))
    assert (accepted is None) == mid_refused


def test_a_submission_killed_halfway_and_run_again_queues_each_line_once(
        idle_client, redis, tmp_path):
    total = 1500
    path = write_file(tmp_path, [line(f"r{i}", max_tokens=4) for i in range(total)])
    env = {**os.environ, "CHATQUEUE_BROKER_URL": redis.url,
           "CHATQUEUE_QUEUE": idle_client.settings.queue}
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "batch", "submit",
                                str(path)], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE)
    batches = BatchClient(idle_client)
    try:
        wait_until(lambda: queued(idle_client) >= 300, timeout=60, what="part of the file")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    half = queued(idle_client)
    assert half < total  # killed halfway

    started = time.monotonic()
    # Other options on the second run change nothing: the batch's own hold for every line.
    report = batches.submit(path, priority=7, stream=True, window="1m")
    elapsed = time.monotonic() - started
    assert not report.created and report.lines == total
    # Every line queued; twice at most the one whose publish the kill interrupted (its record
    # still "pending": it may or may not have reached the queue, so it is published again --
    # and runs once, by the worker's lease, counted once by the write-once backend).
    assert total <= queued(idle_client) <= total + 1
    records = idle_client._redis.mget([accepted_key(line_job_id(report.batch_id, f"r{i}"))
                                       for i in range(total)])
    assert all(record is not None and record.startswith(b"queued ") for record in records)
    assert idle_client._redis.hlen(batch_lines_key(report.batch_id)) == total
    assert batches.status(report.batch_id)["request_counts"]["total"] == total
    # Its progress as Prometheus reads it (nothing has run: the queue has no worker).
    from producer.batches.metrics import BatchCollector

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in BatchCollector(idle_client._redis).collect()
               for s in family.samples}
    assert samples[("chatqueue_batch_requests", (("batch", report.batch_id),
                                                 ("state", "total")))] == total
    assert samples[("chatqueue_batches", (("status", "in_progress"),))] >= 1
    print(f"resubmitted {total} lines ({total - half} new) in {elapsed:.2f} s")


def test_expiry_ends_unstarted_lines_as_batch_expired(idle_client, tmp_path):
    batches = BatchClient(idle_client)
    report = batches.submit(write_file(tmp_path, [line("a"), line("b"), line("c", n=3)]),
                            window="1s")
    time.sleep(1.2)
    assert batches.status(report.batch_id)["status"] == "expired"
    results = list(batches.results(report.batch_id))
    assert [(kind, r["custom_id"]) for kind, r in results] == [
        ("error", "a"), ("error", "b"), ("error", "c")]
    assert [r["error"]["code"] for _, r in results[:2]] == ["batch_expired"] * 2


def test_cancel_ends_the_batch_and_keeps_what_finished(tiny_client, tmp_path):
    batches = BatchClient(tiny_client)
    lines = [line(f"c{i}", max_completion_tokens=200, temperature=1.0, seed=i)
             for i in range(24)]
    report = batches.submit(write_file(tmp_path, lines), window="1h")
    wait_until(lambda: batches.status(report.batch_id)["request_counts"]["completed"] >= 1,
               timeout=60, what="a first line to finish")
    cancelling = batches.cancel(report.batch_id)
    assert cancelling["status"] in ("cancelling", "cancelled")
    batch = batches.wait(report.batch_id, timeout=60)
    assert batch["status"] == "cancelled"
    counts = batch["request_counts"]
    assert counts["completed"] + counts["failed"] == 24 and counts["failed"] > 0
    results = list(batches.results(report.batch_id))
    assert sorted(r["custom_id"] for _, r in results) == sorted(f"c{i}" for i in range(24))
    codes = {r["error"]["code"] for kind, r in results if kind == "error"}
    assert codes == {"batch_cancelled"}
    assert sum(kind == "output" for kind, _ in results) == counts["completed"]


def delivery_state(redis_client: Any, queue: str, job_ids: list[str]) -> dict[str, Any]:
    """Where each job's message is (one of the queue's priority lists, kombu's unacked hash,
    or nowhere: popped and lost), with its unacked_index age, its lease and job record, and
    kombu's restore mutex -- what tells a message lost between BRPOP and kombu's unacked
    bookkeeping from one that sits in the unacked hash while nobody restores it."""
    lists = [queue] + [f"{queue}\x06\x16{p}" for p in PRIORITY_STEPS[1:]]
    queued = {key: [bytes(m) for m in redis_client.lrange(key, 0, -1)] for key in lists}
    unacked = {bytes(tag): bytes(raw) for tag, raw in redis_client.hgetall("unacked").items()}
    index = {bytes(tag): score for tag, score in
             redis_client.zrange("unacked_index", 0, -1, withscores=True)}
    now = time.time()
    state: dict[str, Any] = {"unacked_mutex": (redis_client.get("unacked_mutex"),
                                               redis_client.pttl("unacked_mutex")),
                             "unacked": len(unacked), "queued": sum(map(len, queued.values()))}
    for job_id in job_ids:
        needle = job_id.encode()
        where = [key for key, messages in queued.items() if any(needle in m for m in messages)]
        tags = [tag for tag, raw in unacked.items() if needle in raw]
        state[job_id] = {
            "queued_in": where,
            "unacked_for_s": [round(now - index[tag], 1) if tag in index else None
                              for tag in tags],
            "lease": (redis_client.get(lease_key(job_id)),
                      redis_client.pttl(lease_key(job_id))),
            "record": redis_client.get(accepted_key(job_id)),
        }
    return state


def test_a_worker_killed_mid_batch_loses_no_line_and_counts_each_once(
        tiny_model_dir, tmp_path):
    # Its own Redis: the short visibility timeout would hand other tests' long jobs out again.
    fast = {"max_job_seconds": "5", "visibility_timeout_s": "8", "redelivery_check_s": "1",
            "job_lease_ttl_s": "3", "job_lease_renew_s": "1", "concurrency": "2"}
    queue = f"kill-{uuid.uuid4().hex[:6]}"
    with redis_server() as server:
        workers = [spawn_worker(worker_env(server.url, tiny_model_dir, queue, **fast), tmp_path)
                   for _ in range(2)]
        try:
            for worker in workers:
                wait_ready(worker)
            with ChatQueueClient(ProducerSettings(broker_url=server.url, queue=queue,
                                                  wait_timeout_s=60)) as client:
                batches = BatchClient(client)
                lines = [line(f"k{i}", max_completion_tokens=96, temperature=1.0, seed=i)
                         for i in range(16)]
                report = batches.submit(write_file(tmp_path, lines))
                job_ids = [line_job_id(report.batch_id, f"k{i}") for i in range(16)]
                victim = workers[0]

                def victim_holds_an_unfinished_line() -> bool:
                    # Killed only while it holds work: the tiny model runs a line in about a
                    # second, so a victim killed at a fixed point may hold none.
                    log = "".join(victim.lines)
                    return any(client.fetch(j) is None for j in job_ids
                               if f"[{j}] received" in log)

                wait_until(victim_holds_an_unfinished_line, timeout=60,
                           what="the victim to hold a line it has not finished")
                victim.process.send_signal(signal.SIGKILL)
                try:
                    batch = batches.wait(report.batch_id, timeout=120)
                except TimeoutError as exc:  # seen once in CI: keep what explains it
                    missing = [j for j in job_ids if client.fetch(j) is None]
                    raise AssertionError(
                        f"{exc}; lines without a result: {missing}; where they are in Redis: "
                        f"{delivery_state(server.client(), queue, missing)}; victim log tail:\n"
                        f"{''.join(victim.lines)[-4000:]}\nsurvivor log tail:\n"
                        f"{''.join(workers[1].lines)[-8000:]}") from exc
                results = list(batches.results(report.batch_id))
                # Lines the victim had taken but the survivor ran: redelivered after the kill.
                survivor = workers[1].name.split("@")[0]
                moved = [j for j in job_ids
                         if any(f"[{j}] received" in text for text in victim.lines)
                         and (client.result(j).worker_name or "").startswith(survivor)]
        finally:
            for worker in workers:
                worker.stop()
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 16, "completed": 16, "failed": 0}
    assert sorted(r["custom_id"] for _, r in results) == sorted(f"k{i}" for i in range(16))
    assert all(kind == "output" for kind, _ in results)
    print(f"{len(moved)} line(s) taken by the killed worker ran again on the other")
    assert moved  # the kill did hit lines the victim held


@pytest.mark.parametrize("holding_the_restore_lock", [
    pytest.param(False, id="as it takes a line"),
    pytest.param(True, id="as it takes a line, holding the restore lock"),
])
def test_a_worker_killed_as_it_takes_a_line_off_the_queue_does_not_lose_it(
        tiny_model_dir, tmp_path, holding_the_restore_lock):
    """SIGKILL between the broker's reply that hands a worker a job and anything the worker
    does with it: the job still runs, on another worker, after the visibility timeout. kombu
    popped first and recorded the job for redelivery after: the job was gone. And a worker
    killed while it held kombu's restore lock kept every other worker from restoring any job
    for the lock's 300 s."""
    fast = {"max_job_seconds": "5", "visibility_timeout_s": "8", "redelivery_check_s": "1",
            "job_lease_ttl_s": "3", "job_lease_renew_s": "1", "concurrency": "2"}
    queue = f"pop-{uuid.uuid4().hex[:6]}"
    with redis_server() as server:
        env = worker_env(server.url, tiny_model_dir, queue, **fast)
        dying = spawn_worker({**env, "CHATQUEUE_TEST_KILL_ON_DELIVERY": queue,
                              "CHATQUEUE_TEST_KILL_HOLDING_RESTORE_LOCK":
                                  str(int(holding_the_restore_lock))},
                             tmp_path, module="tests.support.killed_on_delivery_worker")
        survivor = None
        try:
            wait_ready(dying)
            with ChatQueueClient(ProducerSettings(broker_url=server.url, queue=queue,
                                                  wait_timeout_s=60)) as client:
                batches = BatchClient(client)
                report = batches.submit(write_file(tmp_path, [line("p0", max_tokens=8)]))
                job_id = line_job_id(report.batch_id, "p0")
                assert dying.process.wait(timeout=60) == -signal.SIGKILL
                assert queued(client) == 0  # it died with the line taken off the queue
                # It runs within visibility timeout + checks (+ the restore lock's expiry)
                # of its delivery; 60 s leaves room for the survivor's start on a slow machine.
                survivor = spawn_worker(env, tmp_path)
                wait_ready(survivor)
                try:
                    batch = batches.wait(report.batch_id, timeout=60)
                except TimeoutError as exc:
                    raise AssertionError(
                        f"{exc}; where the line is in Redis: "
                        f"{delivery_state(server.client(), queue, [job_id])}") from exc
                result = client.result(job_id)
        finally:
            for worker in (dying, survivor):
                if worker is not None:
                    worker.stop()
    assert batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    assert (result.worker_name or "").startswith(survivor.name.split("@")[0])


def test_the_batch_commands(redis, tiny_queue, tmp_path):
    env = {**os.environ, "CHATQUEUE_BROKER_URL": redis.url, "CHATQUEUE_QUEUE": tiny_queue}

    def chatqueue(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=120)

    path = write_file(tmp_path, [line("a", max_tokens=48), line("b", n=2)])
    submitted = chatqueue("batch", "submit", str(path), "--window", "30m", "--priority", "3",
                          "--id", f"batch_cli{uuid.uuid4().hex[:8]}")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = json.loads(submitted.stdout)["id"]
    waited = chatqueue("batch", "status", batch_id, "--wait", "--timeout", "90")
    assert waited.returncode == 0, waited.stderr
    batch = json.loads(waited.stdout)
    assert (batch["status"], batch["completion_window"], batch["priority"]) == (
        "completed", "30m", 3)
    assert "2/2" in waited.stderr  # the progress line
    out, err = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    fetched = chatqueue("batch", "results", batch_id, "-o", str(out), "--errors", str(err))
    assert json.loads(fetched.stdout) == {"id": batch_id, "output": 1, "error": 1}
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a"]
    assert [json.loads(x)["custom_id"] for x in err.read_text().splitlines()] == ["b"]
    listed = chatqueue("batch", "list")
    assert batch_id in listed.stdout and "completed" in listed.stdout
    cancelled = chatqueue("batch", "cancel", batch_id)  # over already: stays completed
    assert json.loads(cancelled.stdout)["status"] == "completed"
    missing = chatqueue("batch", "status", "batch_nosuch")
    assert missing.returncode == 4


def acl_users() -> tuple[str, dict[str, str]]:
    """deploy/redis/acl.sh's ACL file, and each role's password."""
    roles = ("admin", "producer", "worker", "flower")
    passwords = {role: f"{role}-{uuid.uuid4().hex}" for role in roles}
    env = {"PATH": os.environ["PATH"],
           **{f"REDIS_{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}}
    acl = subprocess.run(["sh", str(REPO_ROOT / "deploy" / "redis" / "acl.sh")], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return acl, passwords


@dataclass
class AclRun:
    server: RedisServer
    worker: WorkerProcess
    client: ChatQueueClient
    denied: list[dict[str, Any]] = field(default_factory=list)  # ACL LOG, once the worker stopped


@contextmanager
def on_acl_logins(acl: str, passwords: dict[str, str], queue: str, tiny_model_dir: Path,
                  tmp_path: Path) -> Iterator[AclRun]:
    """A Redis on `acl`, a ready worker on its worker login and a client on its producer login,
    both on `queue`; at the end the worker stops and `denied` holds what Redis refused."""
    with redis_server(acl=acl, username="admin", password=passwords["admin"]) as server:
        worker = spawn_worker(worker_env(server.url, tiny_model_dir, queue,
                                         redis_username="worker",
                                         redis_password=passwords["worker"]), tmp_path)
        try:
            wait_ready(worker)
            settings = ProducerSettings(broker_url=server.url, redis_username="producer",
                                        redis_password=passwords["producer"], queue=queue,
                                        wait_timeout_s=60)
            with ChatQueueClient(settings) as client:
                run = AclRun(server, worker, client)
                yield run
        finally:
            worker.stop()
        run.denied = server.client().acl_log()


def test_batches_run_on_the_producer_and_worker_logins_of_the_acl(tiny_model_dir, tmp_path):
    """deploy/redis/acl.sh's users: the producer login submits, follows, reads and cancels a
    batch; the worker login counts its lines; Redis refuses nothing (ACL LOG stays empty)."""
    acl, passwords = acl_users()
    queue = f"chatqueue.acl-{uuid.uuid4().hex[:6]}"
    with on_acl_logins(acl, passwords, queue, tiny_model_dir, tmp_path) as run:
        batches = BatchClient(run.client)
        report = batches.submit(write_file(tmp_path, [line("a", max_tokens=16),
                                                      line("b", tools=[{}])]))
        batch = batches.wait(report.batch_id, timeout=60)
        results = list(batches.results(report.batch_id))
        assert any(b["id"] == report.batch_id for b in batches.list())
        batches.cancel(report.batch_id)
        second = batches.submit(write_file(tmp_path, [line("c")], name="2.jsonl"))
        assert batches.cancel(second.batch_id)["status"] in ("cancelling", "cancelled")
    assert "Redis refused" not in run.worker.log()  # it claims its jobs (worker/delivery.py)
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    assert [(kind, r["custom_id"]) for kind, r in results] == [("output", "a"), ("error", "b")]
    assert run.denied == []


def brpop_calls(admin: Any) -> int:
    return int(admin.info("commandstats").get("cmdstat_brpop", {}).get("calls", 0))


def wait_idle_in_a_new_brpop(server: RedisServer, queue: str) -> None:
    """Wait until the worker has acknowledged every job of `queue` (a job's result is stored
    before its ack) and then sent a BRPOP in which it is blocked now: idle, waiting for the
    next job. (Redis counts a blocking command's call when it is sent.)"""
    admin = server.client()

    def acknowledged() -> bool:
        unacked = [json.loads(raw) for raw in admin.hvals("unacked")]
        return admin.llen(queue) == 0 and not any(key == queue for _, _, key in unacked)

    wait_until(acknowledged, timeout=30, what="the worker to acknowledge its job")
    before = brpop_calls(admin)

    def waiting_in_a_new_brpop() -> bool:
        blocked = any(c.get("user") == "worker" and c.get("cmd") == "brpop"
                      and "b" in c.get("flags", "") for c in admin.client_list())
        return blocked and brpop_calls(admin) > before

    wait_until(waiting_in_a_new_brpop, timeout=30,
               what="the worker to wait for its next job in a BRPOP sent after the ack")


def test_a_worker_whose_login_may_not_claim_takes_jobs_with_brpop(tiny_model_dir, tmp_path):
    """A worker login from an ACL older than the claim (no BLMOVE): the worker says so, once,
    and takes its jobs as kombu does. (Without SCRIPT LOAD a worker never started: its leases
    are Lua scripts too.)"""
    acl, passwords = acl_users()
    worker_rule = next(rule for rule in acl.splitlines() if rule.startswith("user worker "))
    assert " +blmove" in worker_rule
    acl = acl.replace(worker_rule, worker_rule.replace(" +blmove", ""))
    queue = f"chatqueue.old-acl-{uuid.uuid4().hex[:6]}"
    request = {"messages": TINY_MESSAGES, "params": {**GREEDY, "max_new_tokens": 4}}
    with on_acl_logins(acl, passwords, queue, tiny_model_dir, tmp_path) as run:
        first = run.client.result(run.client.submit(request))
        wait_idle_in_a_new_brpop(run.server, queue)  # it waits for the next job as BRPOP does
        second = run.client.result(run.client.submit(request))
    assert (first.finish_reason, second.finish_reason) == ("length", "length")
    assert run.worker.log().count("Redis refused BLMOVE") == 1
