"""rediss:// with a real TLS redis-server on loopback (certificates made by the test): the
producer and a real worker verify Redis's certificate by default, against
CHATQUEUE_REDIS_CA_FILE; a wrong CA is refused with the TLS error named; turning the check off
needs CHATQUEUE_REDIS_TLS_ALLOW_UNVERIFIED."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_py
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES
from producer import AsyncChatQueueClient, ChatQueueClient, ProducerSettings
from tests.support.logs import wait_logged
from tests.support.servers import (
    RedisServer,
    TlsFiles,
    free_port,
    make_tls_files,
    redis_server,
    spawn_worker,
    wait_ready,
    wait_until,
    worker_env,
)

pytestmark = pytest.mark.integration

VERIFY_FAILED = "certificate verify failed"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def wrong_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that did not sign the server's certificate."""
    return make_tls_files(tmp_path_factory.mktemp("other-tls")).ca


@pytest.fixture(scope="module")
def tls_redis(tls_files: TlsFiles) -> Iterator[RedisServer]:
    with redis_server(tls=tls_files) as server:
        yield server


def test_a_job_flows_end_to_end_with_verification_on(tls_redis, tls_files, tiny_model_dir,
                                                      tmp_path):
    """The URL as README and .env.example show it (rediss://host:port/db, no query): both the
    producer (kombu, Celery's result backend, redis-py) and the worker verify the server."""
    assert tls_redis.url.startswith("rediss://") and "?" not in tls_redis.url
    queue = f"tls-{uuid.uuid4().hex[:6]}"
    worker = spawn_worker(worker_env(tls_redis.url, tiny_model_dir, queue,
                                     redis_ca_file=str(tls_files.ca), concurrency="2",
                                     default_max_new_tokens="64"), tmp_path)
    try:
        wait_ready(worker)
        settings = ProducerSettings(broker_url=tls_redis.url, redis_ca_file=tls_files.ca,
                                    queue=queue, wait_timeout_s=120, _env_file=None)
        with ChatQueueClient(settings) as client:
            assert client.app.connection_for_write().ssl["ssl_ca_certs"] == str(tls_files.ca)
            job_id = client.submit({"messages": TINY_MESSAGES,
                                    "params": {"do_sample": False, "max_new_tokens": 64}})
            assert client.result(job_id).content == TINY_CONTENT
            streamed = "".join(event.text for event in client.stream(job_id)
                               if event.type == "content")
            assert streamed == TINY_CONTENT

        async def through_asyncio() -> str:  # the gateway's client: redis.asyncio over TLS
            async with AsyncChatQueueClient(settings) as aclient:
                job = await aclient.submit({"messages": TINY_MESSAGES,
                                            "params": {"do_sample": False, "max_new_tokens": 64}})
                return (await aclient.result(job)).content

        assert asyncio.run(through_asyncio()) == TINY_CONTENT
        assert VERIFY_FAILED not in worker.log()
    finally:
        worker.stop()


def test_the_producer_refuses_a_server_its_ca_did_not_sign(tls_redis, wrong_ca):
    settings = ProducerSettings(broker_url=tls_redis.url, redis_ca_file=wrong_ca,
                                queue="chatqueue.tls-wrong", _env_file=None)
    with ChatQueueClient(settings) as client:
        with pytest.raises(redis_py.ConnectionError, match=VERIFY_FAILED):
            client.submit({"messages": TINY_MESSAGES})
        # Each of the producer's three clients checks on its own: kombu's broker channel (it
        # fell back to no check) and Celery's result backend, besides redis-py's above.
        with client.app.connection_for_write() as connection, \
                pytest.raises(OperationalError, match=VERIFY_FAILED):
            connection.default_channel.client.ping()
        with pytest.raises(redis_py.ConnectionError, match=VERIFY_FAILED):
            client.app.backend.client.ping()
    # Without a CA file the system's CAs are used: a private CA is not among them.
    plain = ProducerSettings(broker_url=tls_redis.url, queue="chatqueue.tls-wrong",
                             _env_file=None)
    with ChatQueueClient(plain) as client, \
            pytest.raises(redis_py.ConnectionError, match=VERIFY_FAILED):
        client.submit({"messages": TINY_MESSAGES})
    assert tls_redis.client().llen("chatqueue.tls-wrong") == 0


def test_the_worker_refuses_a_server_its_ca_did_not_sign(tls_redis, wrong_ca, tiny_model_dir,
                                                        tmp_path):
    worker = spawn_worker(worker_env(tls_redis.url, tiny_model_dir, "chatqueue.tls-wrong",
                                     redis_ca_file=str(wrong_ca)), tmp_path)
    try:
        wait_until(lambda: VERIFY_FAILED in worker.log() or worker.process.poll() is not None,
                   timeout=120, what="the worker to fail its TLS handshake")
        # Had it exited, its last lines would come through its pipe after the exit: wait.
        log = wait_logged(worker, VERIFY_FAILED, timeout=10)
        assert " ready." not in log
    finally:
        worker.stop()


def test_no_verification_only_when_explicitly_allowed(tls_redis):
    url = f"{tls_redis.url}?ssl_cert_reqs=none"
    with pytest.raises(ValidationError, match="CHATQUEUE_REDIS_TLS_ALLOW_UNVERIFIED"):
        ProducerSettings(broker_url=url, _env_file=None)
    allowed = ProducerSettings(broker_url=url, redis_tls_allow_unverified=True,
                               queue="chatqueue.tls-none", _env_file=None)
    with ChatQueueClient(allowed) as client:
        client.submit({"messages": TINY_MESSAGES})  # connects without a CA: nothing checked
    assert tls_redis.client().llen("chatqueue.tls-none") == 1


# ----------------------------------------------------------------------------- Sentinel over TLS

MASTER = "chatqueue"


@contextmanager
def tls_sentinel_setup(tls: TlsFiles, sentinel_tls: TlsFiles,
                       workdir: Path) -> Iterator[dict[str, Any]]:
    """A TLS-only primary and replica (the replica replicates over TLS, certificates from
    `tls.ca`) and three sentinels that reach them and each other over TLS (their certificate
    from another CA, `sentinel_tls.ca`, so that a test can trust the one and not the other;
    "bundle" trusts both). The sentinels listen on TLS ports only: a client that asks them over
    plain TCP finds nobody there."""
    bundle = workdir / "both-cas.pem"
    bundle.write_bytes(tls.ca.read_bytes() + sentinel_tls.ca.read_bytes())
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is not on PATH"
    tls_args = ["--tls-cert-file", str(tls.cert), "--tls-key-file", str(tls.key),
                "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "no",
                "--tls-replication", "yes"]
    processes: list[subprocess.Popen[bytes]] = []

    def start(args: list[str], name: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([binary, *args], stdout=(workdir / f"{name}.log").open("wb"),
                                   stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    ports = [free_port(), free_port()]
    nodes = []
    for index, port in enumerate(ports):
        folder = workdir / f"node{index}"
        folder.mkdir()
        replica = ["--replicaof", "127.0.0.1", str(ports[0])] if index else []
        nodes.append(start(["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                            "--save", "", "--appendonly", "no", "--dir", str(folder),
                            *tls_args, *replica], f"node{index}"))
    sentinel_ports = [free_port() for _ in range(3)]
    for index, port in enumerate(sentinel_ports):
        conf = workdir / f"sentinel{index}.conf"
        conf.write_text("\n".join([
            # TLS only (port 0); with tls-replication the sentinels announce their TLS port to
            # each other and talk over it.
            "port 0", f"tls-port {port}", "bind 127.0.0.1", f"dir {workdir}",
            f"sentinel monitor {MASTER} 127.0.0.1 {ports[0]} 2",
            f"sentinel down-after-milliseconds {MASTER} 1000",
            f"sentinel failover-timeout {MASTER} 10000",
            "tls-replication yes", f"tls-cert-file {sentinel_tls.cert}",
            f"tls-key-file {sentinel_tls.key}", f"tls-ca-cert-file {bundle}",
            "tls-auth-clients no", ""]))
        start([str(conf), "--sentinel"], f"sentinel{index}")

    def sentinel(port: int) -> redis_py.Redis:
        return redis_py.Redis(host="127.0.0.1", port=port, socket_timeout=1, ssl=True,
                              ssl_ca_certs=str(sentinel_tls.ca))

    def primary_port() -> int | None:
        seen = []
        for port in sentinel_ports:
            try:
                address = sentinel(port).sentinel_get_master_addr_by_name(MASTER)
            except redis_py.RedisError:
                continue
            if address:
                seen.append(int(address[1]))
        best = max(set(seen), key=seen.count, default=None)
        return best if best is not None and seen.count(best) >= 2 else None

    def replicated() -> bool:
        try:
            info = redis_py.Redis(host="127.0.0.1", port=ports[0], ssl=True,
                                  ssl_ca_certs=str(tls.ca), socket_timeout=1).info("replication")
            known = sentinel(sentinel_ports[0]).sentinel_master(MASTER)
        except redis_py.RedisError:
            return False
        return (info.get("connected_slaves") == 1 and known.get("num-slaves") == 1
                and known.get("num-other-sentinels") == 2)

    try:
        wait_until(replicated, timeout=60, what="the TLS replica and the sentinels")
        yield {"ports": ports, "nodes": nodes, "sentinels": sentinel_ports,
               "addresses": ",".join(f"127.0.0.1:{port}" for port in sentinel_ports),
               "primary_port": primary_port, "bundle": bundle}
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=10)


def test_sentinel_with_tls_nodes_flows_verifies_and_follows_a_failover(
    tls_files, wrong_ca, tiny_model_dir, tmp_path
):
    """Redis Sentinel over TLS in front of TLS-only nodes: the worker and the producer, given
    only the sentinels, the rediss:// scheme and the CA, reach the TLS-only sentinels and verify
    their certificate and the primary's on every client (kombu, the result backend, redis-py
    sync and asyncio), run a job end to end, refuse sentinels and a primary their CA did not
    sign, and follow a failover to the replica over TLS."""
    sentinel_tls = make_tls_files(tmp_path / "sentinel-tls")
    with tls_sentinel_setup(tls_files, sentinel_tls, tmp_path) as setup:
        # With Sentinel the URL names no host: the scheme (TLS) and the database.
        url = "rediss://sentinel-named-primary/0"
        queue = f"tls-sentinel-{uuid.uuid4().hex[:6]}"
        fast = {"redelivery_check_s": "1", "concurrency": "2", "default_max_new_tokens": "64"}
        worker = spawn_worker(worker_env(url, tiny_model_dir, queue,
                                         redis_ca_file=str(setup["bundle"]),
                                         redis_sentinels=setup["addresses"], **fast), tmp_path)
        try:
            wait_ready(worker)
            settings = ProducerSettings(broker_url=url, redis_sentinels=setup["addresses"],
                                        redis_ca_file=setup["bundle"], queue=queue,
                                        wait_timeout_s=120, _env_file=None)
            request = {"messages": TINY_MESSAGES,
                       "params": {"do_sample": False, "max_new_tokens": 64}}
            with ChatQueueClient(settings) as client:
                job_id = client.submit(request)
                assert client.result(job_id).content == TINY_CONTENT
                streamed = "".join(event.text for event in client.stream(job_id)
                                   if event.type == "content")
                assert streamed == TINY_CONTENT

            async def through_asyncio() -> str:  # the gateway's client: redis.asyncio Sentinel
                async with AsyncChatQueueClient(settings) as aclient:
                    job = await aclient.submit(request)
                    return (await aclient.result(job)).content

            assert asyncio.run(through_asyncio()) == TINY_CONTENT

            # The sentinels' own certificate is checked: with a CA that did not sign it, the
            # options every client path gets (sentinel_kwargs) fail the handshake with each
            # sentinel, and so redis-py (sync and asyncio), kombu and the result backend find
            # no primary (redis-py's MasterNotFoundError does not carry the cause).
            other = ProducerSettings(broker_url="redis://sentinel-named-primary/0",
                                     redis_sentinels=setup["addresses"],
                                     redis_sentinel_tls=True, redis_ca_file=wrong_ca,
                                     queue=queue, _env_file=None)
            for port in setup["sentinels"]:
                with pytest.raises(redis_py.ConnectionError, match=VERIFY_FAILED):
                    redis_py.Redis(host="127.0.0.1", port=port, **other.sentinel_kwargs()).ping()
            no_primary = "No master found"
            _each_sync_path_fails(other, no_primary)

            async def ask_with_wrong_ca() -> None:
                async with AsyncChatQueueClient(other) as aclient:
                    await aclient._redis.ping()

            with pytest.raises(redis_py.ConnectionError, match=no_primary):
                asyncio.run(ask_with_wrong_ca())

            # The sentinels verified (their CA only), the primary is not: each client refuses it.
            wrong = ProducerSettings(broker_url=url, redis_sentinels=setup["addresses"],
                                     redis_ca_file=sentinel_tls.ca, queue=queue, _env_file=None)
            _each_sync_path_fails(wrong, VERIFY_FAILED)

            # The primary dies; the sentinels promote the replica; jobs flow on over TLS.
            old = setup["primary_port"]()
            setup["nodes"][setup["ports"].index(old)].kill()
            wait_until(lambda: setup["primary_port"]() not in (None, old), timeout=60,
                       what="the sentinels to promote the replica")
            with ChatQueueClient(settings) as client:
                after = client.submit(request)
                assert client.result(after, timeout=120).content == TINY_CONTENT
            assert VERIFY_FAILED not in worker.log()
        finally:
            worker.stop()


def _each_sync_path_fails(settings: ProducerSettings, match: str) -> None:
    """The producer's own Redis client, Celery's broker (kombu) and its result backend all
    fail to reach the primary, with `match` in the error."""
    with ChatQueueClient(settings) as client:
        with pytest.raises(redis_py.ConnectionError, match=match):
            client._redis.ping()
        with client.app.connection_for_write() as connection, \
                pytest.raises(OperationalError, match=match):
            connection.default_channel.client.ping()
        with pytest.raises(redis_py.ConnectionError, match=match):
            client.app.backend.client.ping()
