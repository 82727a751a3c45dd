"""Download once through a real mirror, stop the mirror, and serve jobs with no hub at all --
pinned to the commit and the manifest digest the download printed."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES, TINY_THINKING
from producer import ChatQueueClient, ChatRequest, ProducerSettings
from tests.support.mirror import publish_model, running_olah
from worker.offline import OFFLINE_VARIABLES

pytestmark = pytest.mark.integration

REPO = "acme/offline-chat"


def test_downloaded_model_serves_jobs_with_the_mirror_stopped(
    tiny_model_dir, tmp_path, redis, start_worker
):
    model_dir = tmp_path / "model"
    with running_olah(tmp_path / "olah") as olah:
        commit = publish_model(tiny_model_dir, olah.mirrors_path, REPO)
        # As an operator pins a model: the command line, a commit, the digest it prints.
        download = subprocess.run(
            [str(Path(sys.executable).with_name("chatqueue-worker")), "download",
             "--model-id", REPO, "--revision", commit, "--endpoint", olah.endpoint,
             "--model-dir", str(model_dir), "--no-progress"],
            env={k: v for k, v in os.environ.items() if k not in OFFLINE_VARIABLES},
            capture_output=True, text=True, timeout=120,
        )
        endpoint = olah.endpoint
    assert download.returncode == 0, download.stderr
    assert f"commit:    {commit}" in download.stdout
    digest = next(line.split()[1] for line in download.stdout.splitlines()
                  if line.startswith("sha256:"))

    queue = f"offline-{uuid.uuid4().hex[:6]}"
    worker = start_worker(model_dir, queue, hf_endpoint=endpoint, default_max_new_tokens="64",
                          model_revision=commit, model_sha256=digest)
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue)) as client:
        job_id = client.submit(ChatRequest.model_validate(
            {"messages": TINY_MESSAGES, "params": {"do_sample": False}}))
        result = client.result(job_id, timeout=120)

    assert (result.thinking, result.content) == (TINY_THINKING, TINY_CONTENT)
    assert (result.model_id, result.model_revision) == (REPO, commit)
    assert endpoint.split("//")[1] not in worker.log()  # it never even names the mirror
