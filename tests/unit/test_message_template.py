"""The asyncio client's Celery message from a template (producer/client.py _MessageTemplate)
is, byte for byte, the message Celery and kombu build for the same job; no Redis is touched.
tests/integration/test_clients.py compares the full build with what send_task pushes."""

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
