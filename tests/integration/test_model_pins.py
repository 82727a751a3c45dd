"""A real `chatqueue-worker run` refuses a model folder that is not the pinned one (issue 17,
point 6): exit 78 before its consumer starts, the message naming setting, expected and found,
and the jobs already waiting left in the queue for a worker with the right model."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from producer import ChatQueueClient, ChatRequest, ProducerSettings
from tests.support.logs import wait_logged
from worker.exit_status import START_FAILED
from worker.manifest import manifest_digest, read_manifest

pytestmark = pytest.mark.integration

WAITING_JOBS = 2
# Never run: any valid request does. (Kept free of the dev tooling's imports, which move.)
MESSAGES = [{"role": "user", "content": "What is 2 + 3?"}]
EXIT_TIMEOUT_S = 120.0


def _pickle_dropped_in(model_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str], str]:
    copy = tmp_path / "with-pickle"
    shutil.copytree(model_dir, copy)
    (copy / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")
    return copy, {}, "pytorch_model.bin: not listed in chatqueue-manifest.json"


def _other_commit_pinned(model_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str], str]:
    commit = read_manifest(model_dir).commit
    pinned = "0" * 40
    return model_dir, {"model_revision": pinned}, (
        f"CHATQUEUE_MODEL_REVISION pins commit {pinned}, but the folder holds commit {commit}")


def _other_digest_expected(model_dir: Path, tmp_path: Path) -> tuple[Path, dict[str, str], str]:
    digest = manifest_digest(read_manifest(model_dir))
    expected = "f" * 64
    return model_dir, {"model_sha256": expected}, (
        f"CHATQUEUE_MODEL_SHA256 expects manifest digest {expected}, but the folder's is {digest}")


@pytest.mark.parametrize(
    "make_setup",
    [
        pytest.param(_pickle_dropped_in, id="unlisted-pickle"),
        pytest.param(_other_commit_pinned, id="commit-differs"),
        pytest.param(_other_digest_expected, id="digest-differs"),
    ],
)
def test_a_worker_refuses_a_model_folder_that_is_not_the_pinned_one(
    make_setup: Callable[[Path, Path], tuple[Path, dict[str, str], str]],
    tiny_model_dir: Path,
    tmp_path: Path,
    redis: Any,  # tests/integration/conftest.py: a real redis-server
    start_worker: Callable[..., Any],  # ... and real `chatqueue-worker run` processes
) -> None:
    model_dir, settings, message = make_setup(tiny_model_dir, tmp_path)
    queue = f"pins-{uuid.uuid4().hex[:6]}"
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue)) as client:
        request = ChatRequest.model_validate(
            {"messages": MESSAGES, "params": {"do_sample": False}})
        jobs = [client.submit(request) for _ in range(WAITING_JOBS)]

        worker = start_worker(model_dir, queue, ready=False, concurrency="2", **settings)
        returncode = worker.process.wait(timeout=EXIT_TIMEOUT_S)

        assert returncode == START_FAILED, worker.log()[-3000:]
        # Its last lines come through the pipe after its exit: wait for them.
        wait_logged(worker, message, "worker start failed, exiting before taking any job")
        assert int(redis.client().llen(queue)) == WAITING_JOBS
        assert [client.state(job) for job in jobs] == ["PENDING"] * WAITING_JOBS
