"""The sentinels as deploy/redis/sentinel.sh runs them (real redis-server --sentinel processes in
front of a real primary and replica): clients log in as the sentinels' "client" user, which may
ask for the primary and nothing that changes the sentinels; with certificates configured the
sentinels serve TLS only, and every client path reaches them over it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_py

from chatqueue_dev.models import TINY_MESSAGES
from chatqueue_dev.sentinel import MASTER, PASSWORDS, SENTINEL_CLIENT, SentinelCluster
from producer import AsyncChatQueueClient, ChatQueueClient, ProducerSettings
from tests.support.sentinel import sentinel_cluster
from tests.support.servers import make_tls_files

pytestmark = pytest.mark.integration

CLIENT_LOGIN = {"username": SENTINEL_CLIENT, "password": PASSWORDS["SENTINEL_CLIENT_PASSWORD"]}


@pytest.fixture(scope="module", params=["plain", "tls"])
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelCluster]:
    tls = make_tls_files(tmp_path_factory.mktemp("tls")) if request.param == "tls" else None
    with sentinel_cluster(tls=tls) as running:
        yield running


def test_every_client_path_asks_the_sentinels_as_their_client_user(
    cluster: SentinelCluster, tmp_path: Path
) -> None:
    """The producer's redis-py Sentinel (sync and asyncio), kombu's broker transport and Celery's
    result backend find the primary through the sentinels as "client" (over TLS when the
    sentinels serve only TLS: a plain connection finds nobody there), a job is queued on the
    primary, and the sentinels' ACL refused nothing any of them sent."""
    for index in range(len(cluster.sentinels)):
        cluster.sentinel_client(index).acl_log_reset()
    queue = f"chatqueue.sentinel-acl-{uuid.uuid4().hex[:6]}"  # the producer ACL's queues
    settings = ProducerSettings(**cluster.producer_settings(), queue=queue, _env_file=None)
    with ChatQueueClient(settings) as client:
        assert client._redis.ping()
        with client.app.connection_for_write() as connection:
            assert connection.default_channel.client.ping()
        assert client.app.backend.client.ping()
        job_id = client.submit({"messages": TINY_MESSAGES})

    async def through_asyncio() -> str:
        async with AsyncChatQueueClient(settings) as aclient:
            assert await aclient._redis.ping()
            return await aclient.submit({"messages": TINY_MESSAGES})

    async_job_id = asyncio.run(through_asyncio())
    primary = cluster.admin()
    assert primary.llen(queue) == 2, (job_id, async_job_id)  # interactive: the queue's own list
    assert cluster.acl_refusals() == []


@pytest.mark.parametrize("command", [
    pytest.param(("SENTINEL", "FAILOVER", MASTER), id="failover"),
    pytest.param(("SENTINEL", "SET", MASTER, "quorum", "1"), id="set"),
    pytest.param(("SENTINEL", "REMOVE", MASTER), id="remove"),
    pytest.param(("SENTINEL", "RESET", "*"), id="reset"),
    pytest.param(("SENTINEL", "MONITOR", "other", "127.0.0.1", "1", "1"), id="monitor"),
    pytest.param(("SENTINEL", "CONFIG", "SET", "resolve-hostnames", "no"), id="config"),
    pytest.param(("ACL", "SETUSER", "client", "+@all"), id="acl"),
    pytest.param(("SHUTDOWN",), id="shutdown"),
])
def test_the_client_user_cannot_change_the_sentinels(
    cluster: SentinelCluster, command: tuple[str, ...]
) -> None:
    before = cluster.sentinel_client().sentinel_master(MASTER)
    asking = cluster.sentinel_client(**CLIENT_LOGIN)
    with pytest.raises(redis_py.exceptions.NoPermissionError):
        asking.execute_command(*command)
    after = cluster.sentinel_client().sentinel_master(MASTER)
    assert (after["quorum"], after["ip"], after["port"]) == (
        before["quorum"], before["ip"], before["port"])
    # What the client user needs still answers.
    assert asking.sentinel_get_master_addr_by_name(MASTER) == (
        b"127.0.0.1", cluster.primary_port())


def test_the_sentinels_own_password_still_may_change_them(cluster: SentinelCluster) -> None:
    """The refusal above is the client user's: the default user (the sentinels among
    themselves, the operator) keeps every command."""
    operator = cluster.sentinel_client()
    quorum = operator.sentinel_master(MASTER)["quorum"]
    assert operator.execute_command("SENTINEL", "SET", MASTER, "quorum", str(quorum))
    with pytest.raises(redis_py.AuthenticationError):
        cluster.sentinel_client(username=SENTINEL_CLIENT, password="wrong").ping()
