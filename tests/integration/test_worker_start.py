"""A worker that cannot become ready exits before it takes a job; the jobs wait for a good one.

Each case starts a real `chatqueue-worker run` process with jobs already waiting in its queue.
Celery logs an exception raised by a `worker_init` receiver and goes on to consume, so a check
of the function behind the start is not enough: only the real process shows whether the
worker drains the queue into failures.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES
from producer import ChatQueueClient, ChatRequest, ProducerSettings
from tests.support.logs import wait_logged
from tests.support.servers import (
    RedisServer,
    WorkerProcess,
    spawn_worker,
    wait_ready,
    worker_env,
)
from worker.exit_status import ENGINE_DIED, START_FAILED

pytestmark = pytest.mark.integration

WAITING_JOBS = 3
EXIT_TIMEOUT_S = 120.0


def _absent(model_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return tmp_path / "no-such-model", {}


def _corrupted(model_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    copy = tmp_path / "corrupted"
    shutil.copytree(model_dir, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte deep in the weights: same size, wrong content
    weights.write_bytes(bytes(data))
    return copy, {}


def _cuda_absent(model_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    return model_dir, {"device": "cuda:0"}


@pytest.fixture()
def queue_with_jobs(redis: RedisServer) -> Iterator[tuple[str, list[str], ChatQueueClient]]:
    queue = f"start-{uuid.uuid4().hex[:6]}"
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue,
                                          wait_timeout_s=120)) as client:
        request = ChatRequest.model_validate(
            {"messages": TINY_MESSAGES, "params": {"do_sample": False}})
        jobs = [client.submit(request) for _ in range(WAITING_JOBS)]
        yield queue, jobs, client


@pytest.fixture()
def spawn(redis: RedisServer, tiny_model_dir: Path,
          tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(model_dir: Path, queue: str, **settings: str) -> WorkerProcess:
        # The environment is built from the good model (it names the model id); model_dir then
        # points the worker at the folder under test.
        env = worker_env(redis.url, tiny_model_dir, queue, concurrency="4",
                         default_max_new_tokens="64", **settings)
        env["CHATQUEUE_MODEL_DIR"] = str(model_dir)
        worker = spawn_worker(env, tmp_path)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _queued(redis: RedisServer, queue: str) -> int:
    return int(redis.client().llen(queue))


@pytest.mark.parametrize(
    ("make_setup", "message"),
    [
        pytest.param(_absent, "does not exist. Fetch it with: chatqueue-worker download",
                     id="model-folder-absent"),
        pytest.param(_corrupted, "model.safetensors", id="weights-corrupted"),
        pytest.param(_cuda_absent, "CUDA is not available", id="cuda-asked-for-not-there"),
    ],
)
def test_a_worker_that_cannot_become_ready_exits_and_takes_no_job(
    make_setup, message, tiny_model_dir, tmp_path, redis, queue_with_jobs, spawn
):
    queue, jobs, client = queue_with_jobs
    model_dir, settings = make_setup(tiny_model_dir, tmp_path)
    assert _queued(redis, queue) == WAITING_JOBS

    worker = spawn(model_dir, queue, **settings)
    returncode = worker.process.wait(timeout=EXIT_TIMEOUT_S)

    assert returncode == START_FAILED, worker.log()[-3000:]
    # Its last lines come through the pipe after its exit: wait for them.
    log = wait_logged(worker, message, "worker start failed, exiting before taking any job")
    assert " ready." not in log
    assert _queued(redis, queue) == WAITING_JOBS
    assert [client.state(job) for job in jobs] == ["PENDING"] * WAITING_JOBS


def test_jobs_left_by_a_worker_that_failed_to_start_are_served_by_a_healthy_one(
    tiny_model_dir, tmp_path, redis, queue_with_jobs, spawn
):
    queue, jobs, client = queue_with_jobs
    bad = spawn(tmp_path / "no-such-model", queue)
    assert bad.process.wait(timeout=EXIT_TIMEOUT_S) == START_FAILED

    spawn(tiny_model_dir, queue)
    results = [client.result(job, timeout=120) for job in jobs]
    assert [r.content for r in results] == [TINY_CONTENT] * WAITING_JOBS
    assert _queued(redis, queue) == 0


def test_a_worker_whose_engine_dies_stops_consuming_and_gives_its_jobs_back(
    tiny_model_dir, tmp_path, redis
):
    queue = f"dying-{uuid.uuid4().hex[:6]}"
    trigger = tmp_path / "engine-fault"
    env = worker_env(redis.url, tiny_model_dir, queue, concurrency="4",
                     default_max_new_tokens="64")
    env["CHATQUEUE_TEST_ENGINE_FAULT"] = str(trigger)
    dying = spawn_worker(env, tmp_path, module="tests.support.dying_engine_worker")
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue,
                                          wait_timeout_s=120)) as client:
        try:
            wait_ready(dying)  # its warm-up ran: the engine lives until the trigger exists
            trigger.touch()
            request = ChatRequest.model_validate(
                {"messages": TINY_MESSAGES, "params": {"do_sample": False}})
            jobs = [client.submit(request) for _ in range(WAITING_JOBS)]
            returncode = dying.process.wait(timeout=EXIT_TIMEOUT_S)
        finally:
            dying.stop()
        assert returncode == ENGINE_DIED, dying.log()[-3000:]
        log = wait_logged(dying, "the engine thread died")  # read through a pipe, after the exit
        # Not one job failed: those it had taken went back to the queue.
        states = [client.state(job) for job in jobs]
        assert not {"SUCCESS", "FAILURE"} & set(states), (states, log[-3000:])

        healthy = spawn_worker(worker_env(redis.url, tiny_model_dir, queue, concurrency="4",
                                          default_max_new_tokens="64"), tmp_path)
        try:
            results = [client.result(job, timeout=120) for job in jobs]
        finally:
            healthy.stop()
    assert [r.content for r in results] == [TINY_CONTENT] * WAITING_JOBS


def test_a_worker_without_a_c_compiler_or_the_fast_path_says_so_and_serves_on_torch_paths(
    tiny_model_dir, tmp_path, redis, queue_with_jobs
):
    queue, jobs, client = queue_with_jobs
    env = worker_env(redis.url, tiny_model_dir, queue, concurrency="4",
                     default_max_new_tokens="64", kernel_cache_dir=str(tmp_path / "kernels"),
                     fast_path="false")
    env["CC"] = str(tmp_path / "no-such-compiler")
    worker = spawn_worker(env, tmp_path)
    try:
        results = [client.result(job, timeout=120) for job in jobs]
        assert [r.content for r in results] == [TINY_CONTENT] * WAITING_JOBS
        log = worker.log()
        assert "native CPU attention kernel unavailable" in log and "no-such-compiler" in log
        assert "decode attention: torch" in log
        assert "model forward: transformers' forward (the fast path is turned off)" in log
    finally:
        worker.stop()


def test_a_worker_with_a_c_compiler_decodes_with_the_native_kernel(
    tiny_model_dir, tmp_path, redis, queue_with_jobs, spawn
):
    queue, jobs, client = queue_with_jobs
    worker = spawn(tiny_model_dir, queue, kernel_cache_dir=str(tmp_path / "kernels"))
    results = [client.result(job, timeout=120) for job in jobs]
    assert [r.content for r in results] == [TINY_CONTENT] * WAITING_JOBS
    assert "decode attention: native CPU kernel" in worker.log()
    assert "model forward: fast path for qwen3" in worker.log()  # the tiny model is a Qwen3
    assert "small ops fused (native)" in worker.log()
    assert "OpenMP: the loading thread's team released" in worker.log()
    assert list((tmp_path / "kernels").glob("paged_decode-*.so"))  # built where it was told
    assert list((tmp_path / "kernels").glob("layer_ops-*.so"))
