"""The OpenAI-compatible gateway, driven by the official `openai` package (sync and async
clients) against a real uvicorn process, a real Redis and a real worker on the tiny model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES, TINY_MODEL_ID, TINY_THINKING
from chatqueue_dev.servers import wait_listed
from producer import ChatQueueClient, ProducerSettings
from tests.support.servers import REPO_ROOT, free_port, wait_until

pytestmark = pytest.mark.integration

KEY = "sk-test-gateway-key"


@dataclass
class GatewayProcess:
    url: str
    process: subprocess.Popen[str]


@pytest.fixture(scope="module")
def gateway(redis, tiny_queue, tmp_path_factory) -> Iterator[GatewayProcess]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATQUEUE_")}
    env.update({
        "CHATQUEUE_BROKER_URL": redis.url,
        "CHATQUEUE_QUEUE": tiny_queue,
        "CHATQUEUE_DEFAULT_MODEL": TINY_MODEL_ID,
        "CHATQUEUE_GATEWAY_API_KEYS": f"another-key,{KEY}",
        "CHATQUEUE_GATEWAY_PORT": str(port),
        "CHATQUEUE_GATEWAY_MAX_BODY_BYTES": "65536",
        "CHATQUEUE_GATEWAY_MODELS_CACHE_S": "0",
        "CHATQUEUE_GATEWAY_FILES_DIR": str(tmp_path_factory.mktemp("gateway-files")),
        "PYTHONUNBUFFERED": "1",
    })
    log = (tmp_path_factory.mktemp("gateway") / "gateway.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli"], cwd=REPO_ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"gateway exited with {process.returncode}"
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(healthy, timeout=60, what="the gateway to answer /healthz", interval=0.1)
    # The worker announces itself within a few seconds of being ready.
    wait_until(lambda: TINY_MODEL_ID in httpx.get(
        f"{url}/v1/models", headers={"authorization": f"Bearer {KEY}"}).text,
        timeout=30, what="the tiny model to be listed")
    yield GatewayProcess(url=url, process=process)
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture()
def sync_openai(gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture()
def producer(redis, tiny_queue) -> Iterator[ChatQueueClient]:
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=tiny_queue,
                                          wait_timeout_s=120)) as client:
        yield client


def test_models_lists_the_live_worker_model(sync_openai):
    assert TINY_MODEL_ID in [model.id for model in sync_openai.models.list()]


def test_completion(sync_openai):
    reply = sync_openai.chat.completions.create(model=TINY_MODEL_ID, messages=TINY_MESSAGES,
                                                temperature=0)

    choice = reply.choices[0]
    assert choice.message.content == TINY_CONTENT
    assert choice.message.reasoning_content == TINY_THINKING  # type: ignore[attr-defined]
    assert choice.finish_reason == "stop"
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.completion_tokens_details.reasoning_tokens > 0
    assert reply.model == TINY_MODEL_ID and reply.id.startswith("chatcmpl-")


def test_stream_deltas_concatenate_to_the_result(gateway, producer):
    async def run() -> tuple[str, str, str | None, object, str]:
        async with openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=KEY,
                                      max_retries=0) as client:
            stream = await client.chat.completions.create(
                model=TINY_MODEL_ID, messages=TINY_MESSAGES, temperature=0, stream=True,
                stream_options={"include_usage": True})
            thinking, content, finish, usage, job = "", "", None, None, ""
            async for chunk in stream:
                job = chunk.id.removeprefix("chatcmpl-")
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    delta = choice.delta
                    thinking += getattr(delta, "reasoning_content", None) or ""
                    assert getattr(delta, "reasoning", None) == getattr(
                        delta, "reasoning_content", None)
                    content += delta.content or ""
                    finish = choice.finish_reason or finish
            return thinking, content, finish, usage, job

    thinking, content, finish, usage, job_id = asyncio.run(run())

    result = producer.result(job_id)
    assert (thinking, content) == (result.thinking, result.content) == (TINY_THINKING,
                                                                        TINY_CONTENT)
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == result.usage.completion_tokens


def test_a_client_that_disconnects_cancels_its_job(sync_openai, producer):
    stream = sync_openai.chat.completions.create(
        model=TINY_MODEL_ID, messages=TINY_MESSAGES, stream=True, max_tokens=256,
        extra_body={"ignore_eos": True})
    for chunk in stream:
        job_id = chunk.id.removeprefix("chatcmpl-")
        if chunk.choices and (chunk.choices[0].delta.content
                              or getattr(chunk.choices[0].delta, "reasoning_content", None)):
            break  # generating: now go away
    stream.close()

    result = producer.result(job_id)
    assert result.finish_reason == "cancelled"
    assert result.usage.completion_tokens < 256


def test_bad_request_names_the_field_the_limit_and_the_value(sync_openai):
    with pytest.raises(openai.BadRequestError) as refused:
        sync_openai.chat.completions.create(model=TINY_MODEL_ID, messages=TINY_MESSAGES,
                                            max_tokens=0)

    error = refused.value.response.json()["error"]
    assert (error["param"], error["limit"], error["value"]) == ("max_tokens", 1, "0")
    assert "max_tokens" in error["message"]


def test_a_request_over_the_worker_limit_is_a_400_in_a_stream_too(sync_openai):
    with pytest.raises(openai.BadRequestError) as refused:
        sync_openai.chat.completions.create(model=TINY_MODEL_ID, messages=TINY_MESSAGES,
                                            max_tokens=100_000, stream=True)
    assert refused.value.response.json()["error"]["code"] == "limit_exceeded"


def test_wrong_key_is_refused(gateway):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong",
                       max_retries=0) as client, pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=TINY_MODEL_ID, messages=TINY_MESSAGES)
    assert httpx.get(f"{gateway.url}/metrics").status_code == 401


def test_unknown_model_is_503_unknown_route_404_big_body_413(gateway, sync_openai):
    with pytest.raises(openai.InternalServerError) as unavailable:
        sync_openai.chat.completions.create(model="nobody/serves-this", messages=TINY_MESSAGES)
    assert unavailable.value.status_code == 503
    assert unavailable.value.response.json()["error"]["code"] == "model_not_available"

    auth = {"authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{gateway.url}/v1/nothing", headers=auth).status_code == 404
    big = httpx.post(f"{gateway.url}/v1/chat/completions", headers=auth,
                     content=b"x" * 100_000)
    assert big.status_code == 413 and big.json()["error"]["limit"] == 65536


def test_metrics_count_requests(gateway, sync_openai):
    sync_openai.models.list()
    text = httpx.get(f"{gateway.url}/metrics",
                     headers={"authorization": f"Bearer {KEY}"}).text
    assert 'chatqueue_gateway_requests_total{route="/v1/models",status="200"}' in text
    assert "chatqueue_gateway_in_flight" in text
    # Batch progress, read from Redis by the scrape on the gateway's (producer) login.
    assert 'chatqueue_batches{status="completed"}' in text


def test_several_gateway_processes_share_the_port_and_metrics_count_them_all(
        redis, tiny_queue, tmp_path):
    """CHATQUEUE_GATEWAY_WORKERS=2: the real chatqueue-gateway serves the port from two
    processes; connections land on both, and /metrics -- whichever process answers it -- counts
    the requests that every process served (prometheus_client's multiprocess mode)."""
    from prometheus_client.parser import text_string_to_metric_families

    served: dict[int, int] = {}  # gateway process -> completions it answered
    scrapes: dict[int, dict[str, float]] = {}  # gateway process -> what its /metrics said
    with gateway_processes(redis.url, tiny_queue, tmp_path) as (process, url, port), \
            contextlib.ExitStack() as connections:
        def on_a_new_connection(call: Callable[[httpx.Client], httpx.Response]
                                ) -> tuple[int, httpx.Response]:
            """`call` over a new connection, and the gateway process that answered it."""
            client = httpx.Client(base_url=url, timeout=60,
                                  limits=httpx.Limits(max_connections=1))
            connections.enter_context(client)
            response = call(client)
            _, client_port = response.extensions["network_stream"].get_extra_info("client_addr")
            return _serving_process(process.pid, port, client_port), response

        def complete(client: httpx.Client) -> httpx.Response:
            # Not closed here: that would close `client`, whose connection says who answered.
            openai_client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused",
                                          max_retries=0, http_client=client)
            reply = openai_client.chat.completions.with_raw_response.create(
                model=TINY_MODEL_ID, messages=TINY_MESSAGES, temperature=0)
            assert reply.parse().choices[0].message.content == TINY_CONTENT
            return reply.http_response

        def completed_on_both() -> bool:
            pid, _ = on_a_new_connection(complete)
            served[pid] = served.get(pid, 0) + 1
            return len(served) == 2

        # Which process accepts a connection is the kernel's choice: new ones until both have.
        wait_until(completed_on_both, timeout=120, what="completions on both processes",
                   interval=0)

        def scraped_on_both() -> bool:
            pid, response = on_a_new_connection(lambda client: client.get("/metrics"))
            scrapes[pid] = {
                f"{sample.name}{sample.labels.get('status', '')}": sample.value
                for family in text_string_to_metric_families(response.text)
                for sample in family.samples
                if sample.labels.get("route") == "/v1/chat/completions"
                and sample.name in ("chatqueue_gateway_requests_total",
                                    "chatqueue_gateway_in_flight")}
            return len(scrapes) == 2

        wait_until(scraped_on_both, timeout=60, what="a scrape from each process", interval=0)
    assert len(served) == 2 and set(scrapes) == set(served)
    for pid, scrape in scrapes.items():
        assert scrape == {"chatqueue_gateway_requests_total200": float(sum(served.values())),
                          "chatqueue_gateway_in_flight": 0.0}, (pid, scrape, served)


@contextlib.contextmanager
def gateway_processes(redis_url: str, queue: str, tmp_path: Path, **env_extra: str
                      ) -> Iterator[tuple[subprocess.Popen[str], str, int]]:
    """The real chatqueue-gateway serving a port from 2 processes, once it lists the tiny
    model: (the CLI's process, its URL, its port)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATQUEUE_", "PROMETHEUS"))}
    env.update({"CHATQUEUE_BROKER_URL": redis_url, "CHATQUEUE_QUEUE": queue,
                "CHATQUEUE_DEFAULT_MODEL": TINY_MODEL_ID, "CHATQUEUE_GATEWAY_PORT": str(port),
                "CHATQUEUE_GATEWAY_WORKERS": "2", "CHATQUEUE_GATEWAY_MODELS_CACHE_S": "0",
                "CHATQUEUE_GATEWAY_FILES_DIR": str(tmp_path / "files"),
                "PYTHONUNBUFFERED": "1", **env_extra})
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "gateway.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli"], cwd=REPO_ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        wait_listed(process, url, TINY_MODEL_ID)
        yield process, url, port
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def test_a_killed_gateway_process_leaves_no_request_in_flight_in_the_metrics(redis, tmp_path):
    """A gateway process killed with SIGKILL never marks itself dead (prometheus_client's
    multiprocess files): the next scrape drops its live gauge, so /metrics stops counting the
    request it held in flight. The request waits on a queue announced live that no worker
    drains."""
    import signal

    import redis as redis_py

    from producer.settings import PRESENCE_KEY, presence_member

    queue = f"held-{os.getpid()}"
    member = presence_member("celery@held", TINY_MODEL_ID, queue)
    raw = redis_py.Redis.from_url(redis.url)
    raw.zadd(PRESENCE_KEY, {member: 4e9})

    def in_flight(url: str) -> float:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        line = next(line for line in text.splitlines() if line.startswith(
            'chatqueue_gateway_in_flight{route="/v1/chat/completions"}'))
        return float(line.split()[-1])

    try:
        with gateway_processes(redis.url, queue, tmp_path) as (process, url, port), \
                socket.create_connection(("127.0.0.1", port)) as held:
            body = json.dumps({"model": TINY_MODEL_ID, "messages": TINY_MESSAGES}).encode()
            held.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                         b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%b"
                         % (len(body), body))  # answered only when its job ends: never
            wait_until(lambda: in_flight(url) == 1.0, timeout=30, what="the request in flight")
            os.kill(_serving_process(process.pid, port, held.getsockname()[1]), signal.SIGKILL)
            wait_until(lambda: in_flight(url) == 0.0, timeout=30,
                       what="the killed process's request to leave the in-flight gauge")
    finally:
        raw.zrem(PRESENCE_KEY, member)
        raw.delete(queue)


def _serving_process(gateway_pid: int, port: int, client_port: int) -> int:
    """The gateway process (the CLI's or one of its children) holding the server end of the
    loopback TCP connection from `client_port` to `port` (Linux: /proc)."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, remote = (int(end.rpartition(":")[2], 16) for end in fields[1:3])
            if (local, remote) == (port, client_port):
                inode = fields[9]
    assert inode is not None, f"no connection from port {client_port} to {port}"
    pending = [gateway_pid]
    while pending:
        pid = pending.pop()
        proc = Path(f"/proc/{pid}")
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if any(os.readlink(fd) == f"socket:[{inode}]" for fd in (proc / "fd").iterdir()):
                return pid
        for task in (proc / "task").iterdir():
            pending += [int(child) for child in (task / "children").read_text().split()]
    raise AssertionError(f"no gateway process holds socket {inode}")


def test_a_queue_over_its_bound_is_shed_with_429(redis):
    """In process over a real Redis: a queue no worker drains, a live worker announced for it,
    and more jobs waiting (on two priority levels) than the bound."""
    import redis as redis_py

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from producer.settings import PRESENCE_KEY, presence_member

    queue, model = f"shed-{os.getpid()}", "org/shed-model"
    raw = redis_py.Redis.from_url(redis.url)
    raw.zadd(PRESENCE_KEY, {presence_member("celery@shed", model, queue): 4e9})
    raw.lpush(queue, "x", "x")
    raw.lpush(f"{queue}\x06\x165", "x")
    app = create_app(GatewaySettings(max_queue_length=2),
                     ProducerSettings(broker_url=redis.url, queue=queue), key_digests=())

    async def post() -> httpx.Response:
        gateway = app.app.state.gateway
        async with gateway.lifespan(app.app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
            return await http.post("/v1/chat/completions",
                                   json={"model": model, "messages": TINY_MESSAGES})

    try:
        refused = asyncio.run(post())
    finally:
        raw.zrem(PRESENCE_KEY, presence_member("celery@shed", model, queue))
        raw.delete(queue, f"{queue}\x06\x165")
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["code"], error["limit"], error["value"]) == ("queue_full", 2, 3)


def test_the_completions_route_answers_what_no_handler_expects_as_the_other_routes_do():
    """POST /v1/chat/completions is served before Starlette's middleware and routing (the hot
    route): with Redis away it still answers OpenAI's 503 queue_unavailable, a GET still gets
    Starlette's 405, and both are counted under the route."""
    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    nothing_listens = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(GatewaySettings(), ProducerSettings(broker_url=nothing_listens),
                     key_digests=())

    async def calls() -> tuple[httpx.Response, httpx.Response, dict[str, float]]:
        gateway = app.app.state.gateway
        # The error is raised on after the answer, as Starlette does, for the server to log.
        async with gateway.lifespan(app.app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
                base_url="http://gw") as http:
            away = await http.post("/v1/chat/completions",
                                   json={"model": TINY_MODEL_ID, "messages": TINY_MESSAGES})
            wrong_method = await http.get("/v1/chat/completions")
        counted = {sample.labels["status"]: sample.value
                   for metric in gateway.metrics.requests.collect() for sample in metric.samples
                   if sample.name.endswith("_total")
                   and sample.labels["route"] == "/v1/chat/completions"}
        return away, wrong_method, counted

    away, wrong_method, counted = asyncio.run(calls())
    assert away.status_code == 503
    assert away.json()["error"]["code"] == "queue_unavailable"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "405"
    assert counted == {"503": 1.0, "405": 1.0}


def test_what_lives_at_startup_is_kept_out_of_the_collectors_full_passes(redis):
    """A full garbage collection over the imported libraries took ~40-65 ms, a pause that
    could land inside a burst: the gateway freezes what is alive once it has started."""
    import gc

    from gateway.app import create_app
    from gateway.settings import GatewaySettings

    app = create_app(GatewaySettings(), ProducerSettings(broker_url=redis.url), key_digests=())

    async def frozen_while_serving() -> int:
        async with app.app.state.gateway.lifespan(app.app):
            return gc.get_freeze_count()

    gc.unfreeze()
    try:
        assert asyncio.run(frozen_while_serving()) > 10_000
    finally:
        gc.unfreeze()


def test_a_queue_length_read_is_reused_with_this_gateways_own_jobs_counted_on_top(redis):
    """Over a real Redis: within its TTL a read of a queue's length is not repeated (jobs that
    others queue show at the next read), and the jobs this gateway queued since the read began
    are counted on top -- so a burst of requests sees each other before any read does."""
    import redis as redis_py

    from gateway.admission import Admission
    from producer.aio import AsyncChatQueueClient

    queue = f"admission-{os.getpid()}"
    raw = redis_py.Redis.from_url(redis.url)
    raw.lpush(queue, "x", "x")
    raw.lpush(f"{queue}\x06\x163", "x")
    now = [0.0]

    async def run() -> list[int]:
        async with AsyncChatQueueClient(ProducerSettings(broker_url=redis.url)) as client:
            admission = Admission(client.redis, models_ttl_s=1.0, queue_length_ttl_s=1.0,
                                  clock=lambda: now[0])
            seen = [await admission.queue_length(queue)]  # 3 waiting, all priorities
            raw.lpush(queue, *["y"] * 10)  # another producer's: not seen until read again
            for _ in range(4):
                admission.queued(queue)
            seen.append(await admission.queue_length(queue))
            now[0] = 5.0  # past the TTL: read again, with what this gateway queued in it
            seen.append(await admission.queue_length(queue))
            admission.queued(queue)
            seen.append(await admission.queue_length(queue))
            return seen

    try:
        seen = asyncio.run(run())
    finally:
        raw.delete(queue, f"{queue}\x06\x163")
    assert seen == [3, 7, 13, 14]


def test_a_queue_length_asked_for_lately_is_kept_fresh_without_requests(redis):
    """A burst after a quiet spell finds the length young: the keeper reads it again every half
    TTL (here 0.1 s) while it was asked for in the last minute -- and only then."""
    import redis as redis_py

    from gateway.admission import Admission
    from producer.aio import AsyncChatQueueClient

    queue = f"kept-{os.getpid()}"
    raw = redis_py.Redis.from_url(redis.url)

    async def run() -> tuple[int, int, bool]:
        async with AsyncChatQueueClient(ProducerSettings(broker_url=redis.url)) as client:
            admission = Admission(client.redis, models_ttl_s=1.0, queue_length_ttl_s=0.1)
            keeper = asyncio.create_task(admission.keep_fresh(kept_s=30))
            try:
                first = await admission.queue_length(queue)
                raw.lpush(queue, "x", "x")
                read = admission.length_read(queue)

                async def kept_read() -> None:
                    while read.reading is None:
                        await asyncio.sleep(0.01)  # until the keeper reads again
                    await read.reading

                await asyncio.wait_for(kept_read(), timeout=10)
                kept = await admission.queue_length(queue)  # served as read: no wait
                read.asked_at -= 60  # not asked for in the last 30 s: left to age
                refreshed_at = read.read_at
                await asyncio.sleep(0.3)
                return first, kept, read.read_at == refreshed_at
            finally:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

    try:
        first, kept, left_alone = asyncio.run(run())
    finally:
        raw.delete(queue)
    assert (first, kept, left_alone) == (0, 2, True)


def test_the_stream_hub_reads_many_streams_with_few_xreads(redis):
    """Over a real Redis, as a worker writes them: 40 jobs' streams relayed through the hub
    each get their events in order up to their end, with a handful of XREADs in all (a read of
    its own per stream and event made 40 x 4); a stream opened while a read blocks is read at
    once, and a stream that stays silent times out."""
    import redis as redis_py

    from gateway.streaming import StreamHub
    from producer.aio import AsyncChatQueueClient
    from producer.settings import stream_key

    raw = redis_py.Redis.from_url(redis.url)
    jobs = [f"hub-{os.getpid()}-{n}" for n in range(40)]
    script = [{"type": "start"}, {"type": "thinking", "text": "a"},
              {"type": "content", "text": "b"}, {"type": "end", "finish_reason": "stop"}]

    def xreads() -> int:
        return int(raw.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))

    async def relay(hub: StreamHub, job_id: str, timeout: float = 30) -> list[str]:
        return [event.type async for events in hub.batches(job_id, timeout)
                for event in events]

    async def run() -> tuple[list[list[str]], int, list[str], int]:
        async with AsyncChatQueueClient(ProducerSettings(broker_url=redis.url)) as client:
            hub = StreamHub(client)
            streams = [asyncio.ensure_future(relay(hub, job)) for job in jobs]
            before = xreads()
            for fields in script:  # one pipeline per step, as the worker's relay writes
                pipe = raw.pipeline(transaction=False)
                for job in jobs:
                    pipe.xadd(stream_key(job), fields)
                pipe.execute()
                await asyncio.sleep(0.02)  # the worker's next step comes a while later
            relayed = await asyncio.gather(*streams)
            reads = xreads() - before
            # A silent stream blocks a read; one opened then is read without waiting for it.
            silent = asyncio.ensure_future(relay(hub, f"silent-{os.getpid()}", timeout=0.2))
            while hub.reads_in_flight == 0:
                await asyncio.sleep(0)  # its read is under way
            late = f"late-{os.getpid()}"
            for fields in script:
                raw.xadd(stream_key(late), fields)
            late_events = await asyncio.wait_for(relay(hub, late), timeout=0.9)
            still_silent = int(not silent.done())
            with pytest.raises(TimeoutError):
                await silent
            await hub.aclose()
            return relayed, reads, late_events, still_silent

    relayed, reads, late_events, still_silent = asyncio.run(run())
    order = [fields["type"] for fields in script]
    assert relayed == [order] * len(jobs)
    assert reads <= 4 * 4, f"{reads} XREADs for 40 streams of 4 steps"
    assert late_events == order and still_silent == 1


def test_the_gateway_works_on_the_producer_acl_user():
    """deploy/redis/acl.sh's users: a worker may announce itself, the producer user the gateway
    logs in as may read the live workers and the queue lengths (and nothing of this needs more)."""
    import uuid

    import redis as redis_py

    from gateway.app import create_app
    from gateway.settings import GatewaySettings
    from producer.settings import PRESENCE_KEY, presence_member
    from tests.support.servers import redis_server

    passwords = {role: f"{role}-{uuid.uuid4().hex}"
                 for role in ("admin", "producer", "worker", "flower")}
    env = {"PATH": os.environ["PATH"],
           **{f"REDIS_{role.upper()}_PASSWORD": pw for role, pw in passwords.items()}}
    acl = subprocess.run(["sh", str(REPO_ROOT / "deploy" / "redis" / "acl.sh")], env=env,
                         capture_output=True, text=True, check=True, timeout=30).stdout
    model = "org/acl-model"
    queue = f"chatqueue.{model}"  # its own queue: the producer names no single one
    with redis_server(acl=acl, username="admin", password=passwords["admin"]) as server:
        worker = redis_py.Redis(host="127.0.0.1", port=server.port, username="worker",
                                password=passwords["worker"])
        worker.zadd(PRESENCE_KEY, {presence_member("celery@acl", model, queue): 4e9})
        worker.lpush(queue, "x", "x")
        app = create_app(
            GatewaySettings(max_queue_length=1),
            ProducerSettings(broker_url=server.url, redis_username="producer",
                             redis_password=passwords["producer"]), key_digests=())

        async def calls() -> tuple[list[httpx.Response], str]:
            gateway = app.app.state.gateway
            async with gateway.lifespan(app.app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://gw") as http:
                responses = [await http.get("/healthz"), await http.get("/v1/models"),
                             await http.post("/v1/chat/completions",
                                             json={"model": model, "messages": TINY_MESSAGES})]
                # The asyncio client's own publish (record, message, record) on this login.
                job_id = await gateway.client.submit({"model": model,
                                                      "messages": TINY_MESSAGES})
                return responses, job_id

        (health, models, shed), job_id = asyncio.run(calls())
        admin = redis_py.Redis(host="127.0.0.1", port=server.port, username="admin",
                               password=passwords["admin"])
        assert admin.llen(queue) == 3
        assert admin.get(f"chatqueue:accepted:{job_id}").startswith(b"queued ")
    assert health.status_code == 200
    assert [m["id"] for m in models.json()["data"]] == [model]
    assert shed.status_code == 429 and shed.json()["error"]["value"] == 2


def test_a_batch_from_file_upload_to_output_download(sync_openai, tmp_path):
    lines = [{"custom_id": f"q-{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": TINY_MODEL_ID, "messages": TINY_MESSAGES, "temperature": 0}}
             for i in range(3)]
    lines.append({"custom_id": "bad", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": TINY_MODEL_ID, "messages": TINY_MESSAGES, "max_tokens": 0}})
    source = tmp_path / "requests.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))

    uploaded = sync_openai.files.create(file=source.open("rb"), purpose="batch")
    assert sync_openai.files.content(uploaded.id).content == source.read_bytes()
    batch = sync_openai.batches.create(input_file_id=uploaded.id,
                                       endpoint="/v1/chat/completions", completion_window="1h",
                                       metadata={"team": "tests"})
    assert batch.id in [b.id for b in sync_openai.batches.list()]
    batch = wait_until(lambda: (b := sync_openai.batches.retrieve(batch.id)).status
                       in ("completed", "failed", "expired", "cancelled") and b,
                       timeout=120, what="the batch to complete", interval=0.25)

    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (4, 3, 1)
    assert batch.metadata == {"team": "tests"}
    outputs = [json.loads(line) for line in
               sync_openai.files.content(batch.output_file_id).text.splitlines()]
    errors = [json.loads(line) for line in
              sync_openai.files.content(batch.error_file_id).text.splitlines()]
    assert [o["custom_id"] for o in outputs] == ["q-0", "q-1", "q-2"]
    for output in outputs:
        completion = ChatCompletion.model_validate(output["response"]["body"])
        assert completion.choices[0].message.content == TINY_CONTENT
    assert [e["custom_id"] for e in errors] == ["bad"]
    assert errors[0]["response"]["body"]["error"]["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        sync_openai.batches.retrieve("batch_nonexistent")

