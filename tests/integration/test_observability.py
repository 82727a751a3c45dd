"""A worker's metrics port after real jobs: job and token counters, model state, health check."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from urllib.request import urlopen

import pytest

from chatqueue_dev.models import TINY_MESSAGES
from producer import ChatQueueClient, ChatRequest, JobFailed, ProducerSettings
from tests.support.servers import free_port, wait_until

pytestmark = pytest.mark.integration


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in the exposition")


def health(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker.cli", "health", "--url", url],
                          capture_output=True, text=True, timeout=60)


def test_metrics_show_jobs_and_tokens_and_health_follows_the_model(
    redis, start_worker, tiny_model_dir
):
    port, queue = free_port(), f"metrics-{uuid.uuid4().hex[:6]}"
    worker = start_worker(tiny_model_dir, queue, metrics_port=str(port))
    url = f"http://127.0.0.1:{port}/metrics"
    assert health(url).returncode == 0

    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue)) as client:
        results = [client.result(client.submit(ChatRequest.model_validate(
            {"messages": TINY_MESSAGES, "params": {"do_sample": False}}))) for _ in range(2)]
        with pytest.raises(JobFailed):
            client.result(client.submit(ChatRequest.model_validate(
                {"messages": TINY_MESSAGES, "params": {"max_new_tokens": 100_000}})))

    text = urlopen(url, timeout=10).read().decode()
    assert metric(text, "chatqueue_jobs_total", outcome="stop") == 2
    assert metric(text, "chatqueue_jobs_total", outcome="limit_exceeded") == 1
    generated = sum(r.usage.completion_tokens for r in results)
    assert metric(text, "chatqueue_generated_tokens_total") == generated
    assert metric(text, "chatqueue_model_loaded") == 1

    worker.stop()
    unhealthy = health(url)
    assert unhealthy.returncode == 1 and "unhealthy" in unhealthy.stderr


def test_json_logs_have_one_line_per_job(redis, start_worker, tiny_model_dir):
    queue = f"json-{uuid.uuid4().hex[:6]}"
    worker = start_worker(tiny_model_dir, queue, log_json="true")
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue)) as client:
        job_id = client.submit(ChatRequest.model_validate(
            {"messages": TINY_MESSAGES, "params": {"do_sample": False}}))
        client.result(job_id)

    def job_lines() -> list[dict]:
        entries = [json.loads(line) for line in worker.lines if line.startswith("{")]
        return [e for e in entries if job_id in e["message"] and "done" in e["message"]]

    wait_until(job_lines, timeout=30, what="the job's log line")
    (entry,) = job_lines()
    assert entry["level"] == "INFO"
    assert "finish=stop" in entry["message"] and "completion=" in entry["message"]
