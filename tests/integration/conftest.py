"""Real servers for the integration tier: redis-server and chatqueue worker subprocesses."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer import ChatQueueClient, ProducerSettings
from tests.support.servers import (
    RedisServer,
    WorkerProcess,
    redis_server,
    spawn_worker,
    wait_ready,
    worker_env,
)


@pytest.fixture(scope="session")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server() as server:
        yield server


@pytest.fixture(scope="session")
def start_worker(
    redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start a worker on a model folder and queue; every worker started is stopped at the end."""
    started: list[WorkerProcess] = []
    log_dir = tmp_path_factory.mktemp("worker-logs")

    def start(model_dir: Path, queue: str, *, ready: bool = True, **settings: str) -> WorkerProcess:
        worker = spawn_worker(worker_env(redis.url, model_dir, queue, **settings), log_dir)
        started.append(worker)
        if ready:
            wait_ready(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def tiny_queue(start_worker: Callable[..., WorkerProcess], tiny_model_dir: Path) -> str:
    """One worker on the tiny model, shared by the tests that only submit jobs to it."""
    queue = f"tiny-{uuid.uuid4().hex[:6]}"
    start_worker(
        tiny_model_dir,
        queue,
        max_new_tokens_cap="256",
        default_max_new_tokens="64",
        concurrency="4",
    )
    return queue


@pytest.fixture()
def tiny_client(redis: RedisServer, tiny_queue: str) -> Iterator[ChatQueueClient]:
    with ChatQueueClient(
        ProducerSettings(broker_url=redis.url, queue=tiny_queue, wait_timeout_s=120)
    ) as client:
        yield client
