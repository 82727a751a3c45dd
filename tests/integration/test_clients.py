"""One suite, both clients: ChatQueueClient and AsyncChatQueueClient keep the same contract,
errors and guarantees against a real Redis and a real worker on the tiny model. The asyncio
client runs on its own event loop, behind a blocking adapter, so every test is written once."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
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
from producer.celery_app import create_celery
from tests.support.servers import redis_server, wait_until

pytestmark = pytest.mark.integration

LONG = 256  # the tiny_queue worker's cap: long enough to act on a running job


class BlockingAsyncClient:
    """AsyncChatQueueClient's coroutines and async iterators, driven to completion on one event
    loop in a thread of its own (as an asyncio service would run them)."""

    def __init__(self, settings: ProducerSettings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.client = self._run(self._make(settings))
        self.settings = settings

    @staticmethod
    async def _make(settings: ProducerSettings) -> AsyncChatQueueClient:
        return AsyncChatQueueClient(settings)

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._run(method(*args, **kwargs))
        return call

    def stream(self, job_id: str, timeout: float | None = None) -> Iterator[Any]:
        events: AsyncIterator[Any] = self.client.stream(job_id, timeout=timeout)
        while True:
            try:
                yield self._run(events.__anext__())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


@pytest.fixture(scope="module", params=["sync", "async"])
def client(request, redis, tiny_queue) -> Iterator[Any]:
    settings = ProducerSettings(broker_url=redis.url, queue=tiny_queue, wait_timeout_s=120)
    made = ChatQueueClient(settings) if request.param == "sync" else BlockingAsyncClient(settings)
    yield made
    made.close()


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
