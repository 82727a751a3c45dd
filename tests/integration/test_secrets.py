"""The Redis password and the Hugging Face token never show in a worker's log or in a result,
not even at DEBUG and through connection errors (a Redis restart)."""

from __future__ import annotations

import uuid
from urllib.parse import quote

import pytest

from chatqueue_dev.models import TINY_MESSAGES
from producer import ChatQueueClient, JobFailed, ProducerSettings
from tests.support.servers import redis_server, spawn_worker, wait_ready, worker_env

pytestmark = pytest.mark.integration


def test_password_and_token_never_logged_or_stored(tiny_model_dir, tmp_path):
    password = f"pw:{uuid.uuid4().hex}/x"  # with characters a URL must escape
    token = f"hf_{uuid.uuid4().hex}"
    secrets = [password, quote(password, safe=""), token]
    queue = f"secrets-{uuid.uuid4().hex[:6]}"
    with redis_server(password=password, appendonly=True) as redis:
        env = worker_env(redis.url, tiny_model_dir, queue, redis_password=password,
                         log_level="DEBUG", default_max_new_tokens="16")
        env["HF_TOKEN"] = token
        worker = spawn_worker(env, tmp_path)
        try:
            wait_ready(worker)
            settings = ProducerSettings(broker_url=redis.url, redis_password=password,
                                        queue=queue, wait_timeout_s=120)
            with ChatQueueClient(settings) as client:
                done = client.submit({"messages": TINY_MESSAGES})
                client.result(done)
                refused = client.app.send_task("chatqueue.generate_chat", queue=queue,
                                               kwargs={"request": {"messages": []}}).id
                with pytest.raises(JobFailed):
                    client.result(refused)
                redis.restart()  # connection errors name the URL they failed on
                after = client.submit({"messages": TINY_MESSAGES})
                client.result(after)
            stored = [redis.client().get(f"celery-task-meta-{job_id}")
                      for job_id in (done, refused, after)]
        finally:
            worker.stop()

    log = worker.log()
    assert "Connection to broker lost" in log or "Cannot connect" in log  # the errors were hit
    assert all(value is not None for value in stored)
    for secret in secrets:
        assert secret not in log
        assert all(secret.encode() not in value for value in stored)
