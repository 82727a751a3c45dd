"""One suite, both clients: ChatQueueClient and AsyncChatQueueClient (and their batch clients,
BatchClient and AsyncBatchClient) keep the same contract, errors and guarantees against a real
Redis and a real worker on the tiny model. The asyncio clients run on their own event loop,
behind a blocking adapter, so every test is written once.

test_every_call_is_tested_for_both keeps the suite whole: a public call of the synchronous
clients that no test here names fails it, as does one the asyncio twin lacks."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES, TINY_MULTI_TURN, TINY_THINKING
from producer import (
    AsyncChatQueueClient,
    ChatQueueClient,
    ChatRequest,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    ProducerSettings,
)
from producer.aio_batches import AsyncBatchClient
from producer.batches import BatchClient
from producer.celery_app import create_celery
from producer.schemas import BATCH_PRIORITY
from tests.support.servers import redis_server, wait_until

pytestmark = pytest.mark.integration

LONG = 256  # the tiny_queue worker's cap: long enough to act on a running job


class Blocking:
    """An asyncio object's calls, driven to completion on `loop` (running in another thread):
    a coroutine's result is returned, an async iterator is read as a plain iterator."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target, self._loop = target, loop

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, items: AsyncIterator[Any]) -> Iterator[Any]:
        while True:
            try:
                yield self._run(items.__anext__())
            except StopAsyncIteration:
                return

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not callable(attribute):
            # An asyncio part (AsyncBatchClient.store) is driven the same way.
            has_coroutines = any(inspect.iscoroutinefunction(value)
                                 for value in vars(type(attribute)).values())
            return Blocking(attribute, self._loop) if has_coroutines else attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            out = attribute(*args, **kwargs)
            if inspect.isawaitable(out):
                return self._run(out)
            if isinstance(out, AsyncIterator):
                return self._iterate(out)
            return out
        return call


class BlockingAsyncClient(Blocking):
    """AsyncChatQueueClient on an event loop in a thread of its own (as an asyncio service
    would run it)."""

    def __init__(self, settings: ProducerSettings) -> None:
        loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=loop.run_forever, daemon=True)
        self._thread.start()
        super().__init__(None, loop)
        self._target = self.client = self._run(self._make(settings))

    @staticmethod
    async def _make(settings: ProducerSettings) -> AsyncChatQueueClient:
        return AsyncChatQueueClient(settings)

    def batches(self) -> Blocking:
        return Blocking(AsyncBatchClient(self.client), self._loop)

    def close(self) -> None:
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def batches_of(client: Any) -> Any:
    """The batch client over `client`: BatchClient, or AsyncBatchClient behind the adapter."""
    return client.batches() if isinstance(client, BlockingAsyncClient) else BatchClient(client)


@pytest.fixture(scope="module", params=["sync", "async"])
def client(request, redis, tiny_queue) -> Iterator[Any]:
    settings = ProducerSettings(broker_url=redis.url, queue=tiny_queue, wait_timeout_s=120)
    made = ChatQueueClient(settings) if request.param == "sync" else BlockingAsyncClient(settings)
    yield made
    made.close()


def test_every_call_is_tested_for_both():
    """Each public call of the synchronous clients has its asyncio twin, and a test here that
    names it (the suite below runs every test on both)."""
    source = Path(__file__).read_text()
    for sync, twin in ((ChatQueueClient, AsyncChatQueueClient), (BatchClient, AsyncBatchClient)):
        calls = {name for name, value in vars(sync).items()
                 if callable(value) and not name.startswith("_")} - {"close"}
        assert calls, sync
        missing = sorted(name for name in calls if not hasattr(twin, name))
        assert not missing, f"{twin.__name__} lacks {missing}"
        untested = sorted(name for name in calls
                          if not re.search(rf"\.{name}\(", source.replace(
                              "def test_every_call_is_tested_for_both", "")))
        assert not untested, f"no test calls {sync.__name__}.{untested}"


def chat(messages=TINY_MESSAGES, job_id: str | None = None, **params: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"messages": messages, "params": {"do_sample": False, **params}}
    if job_id:
        raw["job_id"] = job_id
    return raw


def test_submit_then_result_and_fetch(client):
    job_id = client.submit(ChatRequest.model_validate(chat()))
    result = client.result(job_id)

    assert (result.job_id, result.thinking, result.content) == (job_id, TINY_THINKING,
                                                                TINY_CONTENT)
    assert result.finish_reason == "stop"
    assert client.fetch(job_id) == result
    assert client.state(job_id) == "SUCCESS"


def test_submit_chat_takes_messages_and_parameters(client):
    job_id = client.submit_chat(TINY_MESSAGES, do_sample=False)

    assert client.result(job_id).content == TINY_CONTENT
    with pytest.raises(JobFailed) as failed:
        client.submit_chat(TINY_MESSAGES, max_new_tokens=0)
    assert failed.value.error.field == "params.max_new_tokens"


def test_publish_queues_a_planned_job_once(client):
    from producer.core import plan_submission

    job = plan_submission(chat(job_id=f"planned-{uuid.uuid4().hex[:8]}"), client.settings)
    client.publish(job)
    client.publish(job)  # the same request under its id: nothing queued again

    assert client.result(job.job_id).content == TINY_CONTENT
    assert client.queue_for(ChatRequest.model_validate(chat())) == job.queue


@pytest.mark.parametrize("priority", [None, 2], ids=["interactive", "low"])
def test_the_asyncio_clients_message_is_the_one_send_task_pushes(redis, priority):
    """AsyncChatQueueClient builds Celery's message itself and LPUSHes it on its event loop: the
    list and the message are what send_task (the synchronous client) pushes for the same job,
    but for what differs between any two publishes (kombu's delivery tag, the publishing
    thread's reply-to id)."""
    import redis as redis_py

    from producer.core import plan_submission
    from producer.settings import accepted_key

    queue = f"wire-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    settings = ProducerSettings(broker_url=redis.url, queue=queue)
    raw = redis_py.Redis.from_url(redis.url)
    job = plan_submission({**chat(), **({} if priority is None else {"priority": priority})},
                          settings)

    def pushed() -> tuple[bytes, dict[str, Any], bytes]:
        (key,) = raw.keys(f"{queue}*")
        (message,) = raw.lrange(key, 0, -1)
        record = raw.get(accepted_key(job.job_id))
        raw.delete(key, accepted_key(job.job_id))
        decoded = json.loads(message)
        for volatile in ("delivery_tag", "reply_to"):
            assert decoded["properties"].pop(volatile)
        return key, decoded, record

    with ChatQueueClient(settings) as sync:
        sync.publish(job)
        by_send_task = pushed()
    asynchronous = BlockingAsyncClient(settings)
    try:
        asynchronous.publish(job)
        by_the_loop = pushed()
    finally:
        asynchronous.close()
    assert by_the_loop == by_send_task
    assert by_send_task[0] == (queue.encode() if priority is None else
                               f"{queue}\x06\x166".encode())
    assert by_send_task[2].startswith(b"queued ")


def test_jobs_published_together_are_taken_in_the_order_they_were_published(redis, client):
    """Both clients: the jobs of one publish call, and of calls made in one turn of the event
    loop (the asyncio client pushes them together), reach a worker in order (kombu takes the
    oldest message first, from the list's tail)."""
    import redis as redis_py

    from producer.core import plan_submission

    queue = f"order-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    settings = ProducerSettings(broker_url=redis.url, queue=queue)
    jobs = [plan_submission(chat(), settings) for _ in range(5)]
    if isinstance(client, BlockingAsyncClient):
        client.publish(*jobs[:3])  # one call, one pipeline
        client.publish(*jobs[3:])
    else:
        for job in jobs:
            client.publish(job)
    raw = redis_py.Redis.from_url(redis.url)
    taken = [json.loads(raw.rpop(queue))["headers"]["id"] for _ in jobs]
    assert taken == [job.job_id for job in jobs]
    assert raw.llen(queue) == 0


def test_a_job_id_conflict_refuses_the_rest_of_its_publish_only(redis, client):
    """A publish of several jobs stops at one whose id names another request (JobIdConflict):
    the jobs before it are queued, those after it are not; a publish made in the same turn of
    the event loop (the asyncio client sends both in one script) is queued all the same."""
    import redis as redis_py

    from producer.core import plan_submission

    queue = f"conflict-{uuid.uuid4().hex[:8]}"  # no worker consumes it
    settings = ProducerSettings(broker_url=redis.url, queue=queue)
    taken = plan_submission(chat(job_id=f"taken-{uuid.uuid4().hex[:8]}"), settings)
    client.publish(taken)
    clash = plan_submission(chat(TINY_MULTI_TURN, job_id=taken.job_id), settings)
    before, after, other = (plan_submission(chat(), settings) for _ in range(3))
    calls = [(before, clash, after), (other,)]
    if isinstance(client, BlockingAsyncClient):
        outcomes = client._run(_gathered((client.client.publish(*jobs) for jobs in calls),
                                         return_exceptions=True))
    else:
        outcomes = []
        for jobs in calls:
            try:
                for job in jobs:
                    client.publish(job)
                outcomes.append(None)
            except JobIdConflict as exc:
                outcomes.append(exc)
    assert isinstance(outcomes[0], JobIdConflict) and outcomes[1] is None, outcomes
    raw = redis_py.Redis.from_url(redis.url)
    queued = [json.loads(raw.rpop(queue))["headers"]["id"] for _ in range(raw.llen(queue))]
    assert queued == [taken.job_id, before.job_id, other.job_id]

def test_bad_request_is_refused_before_anything_is_queued(client):
    job_id = f"bad-{uuid.uuid4().hex[:8]}"
    with pytest.raises(JobFailed) as failed:
        client.submit(chat(job_id=job_id, max_new_tokens=0))

    error = failed.value.error
    assert (error.code, error.field, error.limit, error.value) == (
        "invalid_request", "params.max_new_tokens", 1, "0")
    with pytest.raises(JobNotFound):
        client.fetch(job_id)


def test_a_job_id_names_one_request(client):
    job_id = f"once-{uuid.uuid4().hex[:8]}"
    assert client.submit(chat(job_id=job_id)) == job_id
    assert client.submit(chat(job_id=job_id)) == job_id  # the same request: nothing queued

    with pytest.raises(JobIdConflict):
        client.submit(chat(TINY_MULTI_TURN, job_id=job_id))
    assert client.result(job_id).content == TINY_CONTENT


def test_unknown_job_is_not_found_at_once(client):
    job_id = f"never-{uuid.uuid4().hex[:8]}"
    for call in (client.result, client.fetch, client.cancel,
                 lambda job_id: list(client.stream(job_id))):
        with pytest.raises(JobNotFound):
            call(job_id)


def test_streamed_text_concatenated_equals_the_result(client):
    job_id = client.submit(chat())
    events = list(client.stream(job_id))
    result = client.result(job_id)

    assert events[0].type == "start" and events[-1].type == "end"
    assert events[-1].finish_reason == result.finish_reason == "stop"
    thinking = "".join(e.text for e in events if e.type == "thinking")
    content = "".join(e.text for e in events if e.type == "content")
    assert (thinking, content) == (result.thinking, result.content)


def test_progress_then_cancel_a_running_job(client):
    job_id = client.submit(chat(max_new_tokens=LONG, ignore_eos=True))
    progress = wait_until(lambda: client.progress(job_id), timeout=60,
                          what=f"job {job_id} to report progress", interval=0.01)
    assert progress.phase in ("queued", "thinking", "answering")

    client.cancel(job_id)

    stopped = client.result(job_id)
    assert stopped.finish_reason == "cancelled"
    assert stopped.usage.completion_tokens < LONG
    assert client.progress(job_id) is None


def test_cancel_of_a_just_queued_job(client):
    job_id = client.submit(chat(max_new_tokens=LONG, ignore_eos=True))
    client.cancel(job_id)

    assert client.result(job_id).finish_reason == "cancelled"


def test_a_failed_job_raises_its_structured_error(client, redis, tiny_queue):
    # Published raw, past the producer's validation, as a buggy client would.
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=tiny_queue)) as raw:
        job = raw.app.send_task("chatqueue.generate_chat", queue=tiny_queue,
                                kwargs={"request": {"messages": TINY_MESSAGES, "top_k": 3}})

    with pytest.raises(JobFailed) as failed:
        client.result(job.id)
    assert failed.value.error.field == "top_k"
    with pytest.raises(JobFailed):
        client.fetch(job.id)


def test_result_wait_times_out(client):
    # The tiny model writes LONG tokens in a fraction of a second on a quiet machine: the job
    # waits behind four others that hold every task slot of the tiny_queue worker, so it is
    # still unfinished however long the client takes to start waiting.
    ahead = [client.submit(chat(max_new_tokens=LONG, ignore_eos=True)) for _ in range(4)]
    job_id = client.submit(chat(max_new_tokens=LONG, ignore_eos=True))
    with pytest.raises(TimeoutError):
        client.result(job_id, timeout=0.05)
    for other in [job_id, *ahead]:
        client.cancel(other)
    assert client.result(job_id).finish_reason == "cancelled"
    assert {client.result(other).finish_reason for other in ahead} <= {"cancelled", "length"}


@pytest.fixture(params=["sync", "async"])
def restartable(request) -> Iterator[tuple[Any, Any]]:
    """A client on a Redis of its own (AOF on), which the test restarts; no worker."""
    with redis_server(appendonly=True) as server:
        settings = ProducerSettings(broker_url=server.url, queue="no-worker", wait_timeout_s=60)
        made = ChatQueueClient(settings) if request.param == "sync" else \
            BlockingAsyncClient(settings)
        yield server, made
        made.close()


def test_a_result_wait_rides_out_a_redis_restart(restartable):
    server, client = restartable
    job_id = client.submit(chat())
    waited: dict[str, Any] = {}

    def wait() -> None:
        try:
            waited["result"] = client.result(job_id, timeout=60)
        except Exception as exc:  # handed to the test's thread
            waited["error"] = exc

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.5)
    server.restart()
    # What a worker's result backend does once Redis is back: store the state and publish it.
    storer = create_celery(client.settings, name="test-storer")
    storer.backend.store_result(job_id, _result(job_id), "SUCCESS")
    waiter.join(timeout=60)
    storer.close()

    assert "error" not in waited, waited.get("error")
    assert waited["result"].content == TINY_CONTENT


def _result(job_id: str) -> dict[str, Any]:
    now = "2026-12-01T00:00:00+00:00"
    return {"job_id": job_id, "model_id": "m", "model_revision": "r", "thinking": "",
            "content": TINY_CONTENT, "finish_reason": "stop",
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "thinking_tokens": 0},
            "timings": {"queued_at": now, "started_at": now, "finished_at": now,
                        "queue_wait_s": 0.0, "generation_s": 0.0, "tokens_per_s": 0.0},
            "worker_host": "h", "device": "cpu"}


def test_a_stream_rides_out_a_redis_restart(restartable):
    server, client = restartable
    job_id = client.submit(chat())
    key, read = f"chatqueue:stream:{job_id}", {}
    server.client().xadd(key, {"type": "start"})

    def follow() -> None:
        try:
            read["events"] = list(client.stream(job_id, timeout=60))
        except Exception as exc:  # handed to the test's thread
            read["error"] = exc

    reader = threading.Thread(target=follow)
    reader.start()
    time.sleep(0.5)
    server.restart()
    redis = server.client()
    redis.xadd(key, {"type": "content", "text": TINY_CONTENT})
    redis.xadd(key, {"type": "end", "finish_reason": "stop"})
    reader.join(timeout=60)

    assert "error" not in read, read.get("error")
    assert [e.type for e in read["events"]] == ["start", "content", "end"]


def test_jobs_published_while_redis_restarts_are_each_queued_once(restartable):
    """Redis goes away with a publish sent and not yet run (its writes paused: CLIENT PAUSE
    WRITE), and comes back from its AOF. Every publish returns, and each of its jobs is in the
    queue exactly once with its record queued. The asyncio client publishes the jobs of one turn
    of its event loop together (one script call): nothing of that batch is lost or doubled."""
    from producer.core import plan_submission
    from producer.settings import accepted_key

    server, client = restartable
    jobs = [plan_submission(chat(), client.settings) for _ in range(20)]
    admin = server.client()
    admin.client_pause(60_000, all=False)  # writes wait; the admin's reads go on
    done: dict[str, Any] = {}

    def publish() -> None:
        try:
            if isinstance(client, BlockingAsyncClient):  # 20 publishes in one turn of its loop
                client._run(_gathered(client.client.publish(job) for job in jobs))
            else:
                for job in jobs:
                    client.publish(job)
            done["ok"] = True
        except Exception as exc:  # handed to the test's thread
            done["error"] = exc

    publisher = threading.Thread(target=publish)
    publisher.start()
    wait_until(lambda: any("b" in entry["flags"] and entry["cmd"] != "client|list"
                           for entry in admin.client_list()),
               timeout=30, what="the publish to wait on the paused Redis")
    server.restart()
    publisher.join(timeout=60)

    assert done == {"ok": True}, done
    raw = server.client()
    queued = [json.loads(message)["headers"]["id"] for message in raw.lrange("no-worker", 0, -1)]
    assert sorted(queued) == sorted(job.job_id for job in jobs)
    assert all(raw.get(accepted_key(job.job_id)).startswith(b"queued ") for job in jobs)


async def _gathered(calls: Any, *, return_exceptions: bool = False) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=return_exceptions)

# --- batches: BatchClient and AsyncBatchClient


def batch_line(custom_id: str, **body: Any) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": TINY_MESSAGES, "temperature": 0, **body}}) + "\n"


def test_a_batch_file_runs_to_its_output_and_error_lines(client, tmp_path):
    batches = batches_of(client)
    source = tmp_path / "requests.jsonl"
    a, b, bad = (f"{name}-{uuid.uuid4().hex[:8]}" for name in ("a", "b", "bad"))  # a new file
    source.write_text(batch_line(a) + batch_line(b) + batch_line(bad, max_tokens=0)
                      + batch_line(a) + "\n")

    report = batches.submit(source, window="1h", metadata={"by": "test_clients"})
    assert (report.lines, report.refused, report.created) == (4, 2, True)
    batch = batches.wait(report.batch_id, timeout=120, interval=0.1)

    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert batch["metadata"] == {"by": "test_clients"}
    lines = list(batches.results(report.batch_id))
    outputs = [line for kind, line in lines if kind == "output"]
    errors = [line for kind, line in lines if kind == "error"]
    assert [o["custom_id"] for o in outputs] == [a, b]
    assert {o["response"]["body"]["choices"][0]["message"]["content"]
            for o in outputs} == {TINY_CONTENT}
    assert [e["custom_id"] for e in errors] == [bad, a]  # a custom_id used twice
    assert report.batch_id in [b["id"] for b in batches.list(limit=100)]

    again = batches.submit(source, window="1h")  # the same file: the same batch, resumed
    assert (again.batch_id, again.created) == (report.batch_id, False)
    assert batches.status(report.batch_id)["request_counts"] == batch["request_counts"]
    assert batches.cancel(report.batch_id)["status"] == "completed"  # over: stays so


def test_submit_lines_of_a_batch_record_and_cancel(client):
    batches = batches_of(client)
    batch_id = f"batch_clients_{uuid.uuid4().hex[:12]}"
    batches.store.create(batch_id, window="1h", window_s=3600, priority=BATCH_PRIORITY,
                         input_file="lines", metadata=None, now=time.time())
    record = batches.store.record(batch_id)
    lines = [batch_line(f"long-{i}", max_tokens=LONG, ignore_eos=True) for i in range(6)]

    assert batches.submit_lines(batch_id, lines, record) == (6, 0)
    cancelling = batches.cancel(batch_id)
    assert cancelling["status"] in ("cancelling", "cancelled")
    assert batches.wait(batch_id, timeout=120, interval=0.1)["status"] == "cancelled"
    assert len(list(batches.results(batch_id))) == 6  # every line ended, one way or another


def test_an_unknown_batch_is_a_lookup_error(client):
    batches = batches_of(client)
    for call in (batches.status, batches.cancel, lambda b: list(batches.results(b)),
                 lambda b: batches.wait(b, timeout=1)):
        with pytest.raises(LookupError):
            call("batch_never_submitted")
