"""The gateway's pure parts: OpenAI requests to jobs, errors naming the OpenAI field, API keys;
the watch over silent streams' results and the stream hub's reads, on a fake Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from gateway.cli import main
from gateway.openai_api import ChunkWriter, sse, to_job
from gateway.settings import GatewaySettings, key_matches
from gateway.streaming import ResultWatch, StreamHub, Subscription
from producer.batches import LineError
from producer.errors import JobFailed
from producer.schemas import MODEL_ID_PATTERN, StreamEvent

MESSAGES = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "there"}]}]


def test_an_openai_request_becomes_a_job():
    options, job = to_job({"model": "org/m", "messages": MESSAGES, "max_tokens": 12,
                           "temperature": 0, "seed": 3, "stream": True,
                           "stream_options": {"include_usage": True},
                           "chat_template_kwargs": {"enable_thinking": False}})

    assert options.stream and options.include_usage and job.model == "org/m"
    assert [(m.role, m.content) for m in job.messages] == [("system", "Be brief."),
                                                           ("user", "Hi \nthere")]
    params = job.params
    assert (params.max_new_tokens, params.do_sample, params.temperature, params.seed,
            params.enable_thinking) == (12, False, None, 3, False)


@pytest.mark.parametrize(("extra", "field", "limit", "value"), [
    pytest.param({"max_tokens": 0}, "max_tokens", 1, "0", id="max-tokens"),
    pytest.param({"max_completion_tokens": 0}, "max_completion_tokens", 1, "0",
                 id="max-completion-tokens"),
    pytest.param({"temperature": 11.0}, "temperature", 10.0, "11.0", id="temperature"),
    pytest.param({"n": 2}, "n", None, None, id="n"),
    pytest.param({"frobnicate": 1}, "frobnicate", None, None, id="unknown-field"),
    pytest.param({"stream": "yes"}, "stream", None, None, id="stream"),
    pytest.param({"model": "../etc"}, "model", MODEL_ID_PATTERN, "'../etc'", id="model"),
])
def test_a_bad_request_names_the_openai_field(extra, field, limit, value):
    with pytest.raises(LineError) as refused:
        to_job({"model": "org/m", "messages": MESSAGES, **extra})
    error = refused.value
    assert (error.param, error.limit, error.value) == (field, limit, value)
    assert error.message.startswith(field) and error.status_code == 400


def test_keys_are_kept_as_digests_and_matched(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# ops\nsha256:{hashlib.sha256(b'from-file').hexdigest()}\n")
    settings = GatewaySettings(api_keys="alpha, beta", api_keys_file=keys_file)
    digests = settings.key_digests()

    assert len(digests) == 3 and all(len(d) == 32 for d in digests)
    assert all(key_matches(k, digests) for k in ("alpha", "beta", "from-file"))
    assert not key_matches("gamma", digests) and not key_matches("", digests)
    assert "alpha" not in repr(settings)


def test_without_a_key_only_loopback_is_served(monkeypatch, capsys):
    for name in ("CHATQUEUE_GATEWAY_API_KEYS", "CHATQUEUE_GATEWAY_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir("/")  # no .env

    assert main(["--host", "0.0.0.0"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert not GatewaySettings(host="::1").listens_beyond_loopback()
    assert GatewaySettings(host="10.0.0.5").listens_beyond_loopback()


class _FakeClient:
    """What ResultWatch uses of AsyncChatQueueClient: .redis.mget and decode_meta."""

    def __init__(self) -> None:
        self.stored: dict[str, str] = {}
        self.reads: list[list[str]] = []
        self.redis = self

    async def mget(self, keys: list[str]) -> list[str | None]:
        self.reads.append(keys)
        return [self.stored.get(key) for key in keys]

    @staticmethod
    def decode_meta(raw: str) -> tuple[str, object]:
        meta = json.loads(raw)
        return meta["status"], meta["result"]


def test_the_result_watch_reads_every_silent_job_in_one_round_trip():
    from producer.schemas import JobError

    failure = JobFailed(JobError(code="invalid_request", field="top_k", message="bad"))

    async def scenario() -> tuple[Any, ...]:
        client = _FakeClient()
        client.stored["celery-task-meta-refused"] = json.dumps(
            {"status": "FAILURE", "result": None})
        client.stored["celery-task-meta-running"] = json.dumps(
            {"status": "PROGRESS", "result": {"phase": "thinking", "tokens": 3}})
        watch = ResultWatch(client, interval_s=0.01)  # type: ignore[arg-type]
        refused, running, queued = (watch.watch(j) for j in ("refused", "running", "queued"))
        await asyncio.wait({refused}, timeout=5)
        pending = (running.done(), queued.done())
        watch.forget("running")
        await watch.aclose()
        return refused, pending, running, client.reads

    import producer.core as core

    original = core.finished_result
    core.finished_result = lambda job_id, state, payload: (_ for _ in ()).throw(failure)
    try:
        refused, pending, running, reads = asyncio.run(scenario())
    finally:
        core.finished_result = original
    assert refused.exception() is failure
    assert pending == (False, False) and running.cancelled()
    assert sorted(reads[0]) == ["celery-task-meta-queued", "celery-task-meta-refused",
                                "celery-task-meta-running"]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Reads:
    """A read whose values come from a list, and that can be held until released."""

    def __init__(self, *values: Any) -> None:
        self.values, self.count = list(values), 0
        self.gate: asyncio.Event | None = None

    async def __call__(self) -> Any:
        self.count += 1
        if self.gate is not None:
            await self.gate.wait()
        value = self.values.pop(0)
        if isinstance(value, BaseException):
            raise value
        return value


def test_a_shared_read_is_reused_for_its_ttl_and_refreshed_ahead_in_the_background():
    from gateway.admission import SharedRead

    async def run() -> None:
        clock, reads = Clock(), Reads("first", "second", "third")
        shared = SharedRead(reads, ttl_s=1.0, clock=clock)
        assert await shared.get() == "first"  # nothing yet: waited for
        clock.now += 0.4
        assert (await shared.get(), reads.count, shared.reading) == ("first", 1, None)
        clock.now += 0.2  # past half the TTL: served at once, read again in the background
        reads.gate = asyncio.Event()
        assert await shared.get() == "first"
        refresh = shared.reading
        assert refresh is not None
        assert await shared.get() == "first"  # no second read while one is in flight
        assert shared.reading is refresh
        reads.gate.set()
        assert await refresh == "second"
        assert (await shared.get(), reads.count) == ("second", 2)
        clock.now += 5  # past the TTL: waited for
        reads.gate = None
        assert (await shared.get(), reads.count) == ("third", 3)

    asyncio.run(run())


def test_requests_that_find_no_young_value_share_one_read():
    from gateway.admission import SharedRead

    async def run() -> None:
        reads = Reads(7)
        reads.gate = asyncio.Event()
        shared = SharedRead(reads, ttl_s=0.0)
        waiting = [asyncio.ensure_future(shared.get()) for _ in range(50)]
        await asyncio.sleep(0)  # let them all ask (a turn of the loop, not a wait for time)
        reads.gate.set()
        assert await asyncio.gather(*waiting) == [7] * 50
        assert reads.count == 1

    asyncio.run(run())


def test_a_failed_background_read_keeps_the_value_and_a_stale_value_raises():
    from gateway.admission import SharedRead

    async def run() -> None:
        clock, reads = Clock(), Reads(1, ConnectionError("away"), ConnectionError("away"))
        shared = SharedRead(reads, ttl_s=1.0, clock=clock)
        assert await shared.get() == 1
        clock.now += 0.6
        assert await shared.get() == 1
        failed = shared.reading
        assert failed is not None
        await asyncio.gather(failed, return_exceptions=True)
        assert await shared.get() == 1  # still young enough
        clock.now += 1.0
        with pytest.raises(ConnectionError):
            await shared.get()

    asyncio.run(run())


@pytest.mark.parametrize("text", [
    pytest.param("Hello", id="plain"),
    pytest.param('say "hi"\\n', id="quotes-backslash"),
    pytest.param("line\nbreak\ttab\x00\x1f", id="control"),
    pytest.param("ünïcödé 中文 🙂 \u2028", id="unicode"),
    pytest.param("</script>{}[],:", id="json-punctuation"),
])
@pytest.mark.parametrize("kind", ["thinking", "content"])
def test_a_text_chunk_framed_once_is_the_chunk_as_json(kind, text):
    """ChunkWriter frames each token's chunk around a head and tail formatted once: the same
    bytes as encoding the whole chunk object, which OpenAI's client parses."""
    writer = ChunkWriter("job-1", 'org/m"odel')
    event = StreamEvent(type=kind, text=text)

    framed = writer.event_bytes(event)

    assert framed == sse(writer.event(event))
    assert framed is not None and framed.startswith(b"data: ") and framed.endswith(b"\n\n")
    chunk = json.loads(framed[len(b"data: "):])
    delta = chunk["choices"][0]["delta"]
    assert (delta.get("content") if kind == "content" else delta["reasoning_content"]) == text
    assert chunk["model"] == 'org/m"odel' and chunk["choices"][0]["finish_reason"] is None


def test_the_end_and_empty_events_keep_their_chunks():
    writer = ChunkWriter("job-1", "org/m")

    assert writer.event_bytes(StreamEvent(type="content", text="")) is None
    end = StreamEvent(type="end", finish_reason="length")
    assert writer.event_bytes(end) == sse(writer.event(end))
    assert json.loads(writer.event_bytes(end)[6:])["choices"][0]["finish_reason"] == "length"


def test_the_gateway_reads_redis_replies_with_hiredis():
    """The gateway extra installs hiredis, which redis-py then parses every reply with (in C,
    not its pure-Python parser): the stream relay parses an XREAD reply per decode step."""
    from redis._parsers import _AsyncHiredisParser

    from producer.aio import AsyncChatQueueClient
    from producer.settings import ProducerSettings

    async def parser() -> object:
        client = AsyncChatQueueClient(ProducerSettings(broker_url="redis://127.0.0.1:1/0"))
        try:
            return client.redis.connection_pool.make_connection()._parser
        finally:
            await client.aclose()

    assert isinstance(asyncio.run(parser()), _AsyncHiredisParser)


def test_metrics_kept_in_a_directory_need_prometheus_told_before_it_is_imported(tmp_path):
    """Several gateway processes add up their metrics through files (gateway/cli.py names the
    directory in PROMETHEUS_MULTIPROC_DIR before they import prometheus_client); a process
    whose prometheus_client keeps its values in memory would expose only its own."""
    from gateway.app import Metrics

    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        Metrics(str(tmp_path))
    alone = Metrics()
    assert alone.exposed is alone.registry


def test_the_number_of_gateway_processes_is_bounded():
    assert GatewaySettings().workers == 1
    with pytest.raises(ValueError, match="workers"):
        GatewaySettings(workers=0)


class _HeldXread:
    """A Redis whose XREADs wait until the test answers them, in the order they were sent."""

    def __init__(self) -> None:
        self.reads: list[tuple[list[str], asyncio.Future[Any]]] = []

    async def xread(self, streams: dict[str, str], block: int, count: int) -> Any:
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.reads.append((list(streams), answer))
        return await answer


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def _entry(key: str, kind: str = "start") -> list[Any]:
    return [[key.encode(), [(b"1-0", {b"type": kind.encode()})]]]


def test_the_hub_merges_reads_whose_replies_come_back_a_loop_turn_apart():
    """Streams opened while a read is out get a read of their own; once a worker's step wakes
    both reads, their replies land a loop turn or two apart, and the hub waits for the second
    before reading again: one read for all, not two that stay split at every step."""
    redis = _HeldXread()
    hub = StreamHub(type("Client", (), {"redis": redis})())  # type: ignore[arg-type]

    async def run() -> list[list[str]]:
        first = hub.subscribe("a", 30)
        await _turns(3)
        second = hub.subscribe("b", 30)  # its flush waits for the read out, then reads alone
        await _turns(6)
        assert [keys for keys, _ in redis.reads] == [["chatqueue:stream:a"],
                                                     ["chatqueue:stream:b"]]
        redis.reads[0][1].set_result(_entry("chatqueue:stream:a"))
        await _turns(1)
        redis.reads[1][1].set_result(_entry("chatqueue:stream:b"))
        await _turns(6)
        assert [event.type for event in first.take() + second.take()] == ["start", "start"]
        for subscription in (first, second):
            hub.unsubscribe(subscription)
        for _, answer in redis.reads[2:]:
            answer.cancel()
        return [keys for keys, _ in redis.reads[2:]]

    assert asyncio.run(run()) == [["chatqueue:stream:a", "chatqueue:stream:b"]]


def test_a_subscription_hands_over_what_came_and_waits_for_news():
    """Events delivered before or during a wait are taken in order; a wait ends on news, on a
    wake (a watched result) or after its timeout; a failure is raised once the events before it
    are taken."""
    from producer.core import StreamCursor

    async def run() -> None:
        stream = Subscription(StreamCursor("j", "chatqueue:stream:j", 30))
        assert not await stream.wait(0.01)  # nothing came: the timeout ends it
        stream.deliver([StreamEvent(type="start")])
        assert await stream.wait(10)  # ready: returns at once
        waiting = asyncio.ensure_future(stream.wait(10))
        await _turns(2)
        stream.deliver([StreamEvent(type="content", text="a")])
        assert await waiting
        assert [event.type for event in stream.take()] == ["start", "content"]
        waiting = asyncio.ensure_future(stream.wait(10))
        await _turns(2)
        stream.wake()
        assert not await waiting  # woken with nothing to take
        stream.deliver([StreamEvent(type="content", text="b")])
        stream.fail(TimeoutError("silent"))
        assert [event.text for event in stream.take()] == ["b"]
        with pytest.raises(TimeoutError):
            stream.take()

    asyncio.run(run())


def test_a_job_streamed_twice_at_once_reads_its_second_stream_on_its_own():
    """The hub follows a stream from one cursor; a second subscription to the same job (not
    something the gateway does, one job per request) is fed by a read of its own, from the
    start, and stops when it is unsubscribed."""
    redis = _HeldXread()
    reads_alone: list[str] = []

    class Client:
        def __init__(self) -> None:
            self.redis = redis

        async def stream_batches(self, job_id: str, timeout: float, submitted: bool):
            reads_alone.append(job_id)
            yield [StreamEvent(type="start")]
            yield [StreamEvent(type="end", finish_reason="stop")]

    hub = StreamHub(Client())  # type: ignore[arg-type]

    async def run() -> list[str]:
        first = hub.subscribe("j", 30)
        second = hub.subscribe("j", 30)
        events = [event.type async for batch in _taken(second) for event in batch]
        assert second.ended and not first.ready
        hub.unsubscribe(second)
        hub.unsubscribe(first)
        for _, answer in redis.reads:
            answer.cancel()
        return events

    assert asyncio.run(run()) == ["start", "end"]
    assert reads_alone == ["j"]


async def _taken(subscription: Subscription):
    while not subscription.ended:
        await subscription.wait(10)
        if events := subscription.take():
            yield events
