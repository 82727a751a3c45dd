"""What the asyncio client writes, byte for byte, without a Redis: its Celery message from a
template (producer/client.py _MessageTemplate) is the message Celery and kombu build for the
same job (tests/integration/test_clients.py compares the full build with what send_task
pushes), and its commands packed by hiredis are the ones redis-py packs in Python."""

from __future__ import annotations

import json

import pytest

from producer import core
from producer.client import ChatQueueClient
from producer.settings import ProducerSettings

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def client():
    made = ChatQueueClient(ProducerSettings(broker_url="redis://127.0.0.1:9/0", queue="q"))
    yield made
    made.close()


@pytest.mark.parametrize("request_", [
    pytest.param({"messages": MESSAGES}, id="plain"),
    pytest.param({"messages": MESSAGES, "priority": 2, "job_id": "a-b_c.1:x"}, id="priority"),
    pytest.param({"messages": [{"role": "user", "content": 'é "q" \\ \u2028 日本 {x} %s'}],
                  "model": "org/other"}, id="odd-text"),
    pytest.param({"messages": MESSAGES, "params": {"temperature": 0.5, "stop": ["x"]}},
                 id="params"),
])
def test_the_templated_message_is_the_one_celery_builds(client, request_):
    for _ in range(2):  # the first builds the template, the second reuses it
        job = core.plan_submission(request_, client.settings)
        queue, message = client.app.task_message(job)
        properties = json.loads(message)["properties"]
        built, _ = client.app._build_task_message(job, properties["priority"],
                                                  properties["delivery_tag"])
        assert message == built
        assert queue == (job.queue if properties["priority"] == 0
                         else f"{job.queue}\x06\x16{properties['priority']}")


def test_delivery_tags_differ_and_log_content_builds_in_full():
    with ChatQueueClient(ProducerSettings(broker_url="redis://127.0.0.1:9/0", queue="q",
                                          log_content=True)) as logged:
        job = core.plan_submission({"messages": MESSAGES}, logged.settings)
        first, second = (json.loads(logged.app.task_message(job)[1]) for _ in range(2))
    assert first["properties"]["delivery_tag"] != second["properties"]["delivery_tag"]
    assert first["headers"]["kwargsrepr"].startswith("{'request': {'messages'")


def test_the_asyncio_clients_commands_are_packed_as_redis_py_packs_them():
    import redis.utils
    from redis.asyncio.connection import Connection

    from producer.aio import AsyncChatQueueClient

    client = AsyncChatQueueClient(ProducerSettings(broker_url="redis://127.0.0.1:9/0"))
    connection = client.redis.connection_pool.make_connection()
    streams = [f"chatqueue:stream:{i:032x}" for i in range(200)]
    for command in [("XREAD", "COUNT", 500, "BLOCK", 1000, "STREAMS", *streams,
                     *["1796183067665-0"] * 200),
                    ("EVALSHA", "0" * 40, 1, "chatqueue:accepted:x", 86_400, "é \x00", b"\xff"),
                    ("CLIENT SETNAME", "gateway"), ("SET", "k", 1.5, "EX", 10)]:
        assert b"".join(connection.pack_command(*command)) == b"".join(
            Connection.pack_command(connection, *command))
    assert (type(getattr(connection.pack_command, "__self__", None)).__name__ ==
            "HiredisRespSerializer") is redis.utils.HIREDIS_AVAILABLE
