"""rediss:// with a real TLS redis-server on loopback (certificates made by the test): the
producer and a real worker verify Redis's certificate by default, against
CHATQUEUE_REDIS_CA_FILE; a wrong CA is refused with the TLS error named; turning the check off
needs CHATQUEUE_REDIS_TLS_ALLOW_UNVERIFIED."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES
from producer import AsyncChatQueueClient, ChatQueueClient, ProducerSettings
from tests.support.servers import (
    RedisServer,
    TlsFiles,
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
        assert VERIFY_FAILED in worker.log()
        assert " ready." not in worker.log()
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
