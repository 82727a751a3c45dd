"""Download once through a real mirror, stop the mirror, and serve jobs with no hub at all."""

from __future__ import annotations

import uuid

import pytest

from producer import ChatQueueClient, ChatRequest, ProducerSettings
from tests.support.mirror import publish_model, running_olah
from worker.devmodels import TINY_CONTENT, TINY_MESSAGES, TINY_THINKING
from worker.download import download_model

pytestmark = pytest.mark.integration

REPO = "acme/offline-chat"


def test_downloaded_model_serves_jobs_with_the_mirror_stopped(
    tiny_model_dir, tmp_path, redis, start_worker
):
    model_dir = tmp_path / "model"
    with running_olah(tmp_path / "olah") as olah:
        commit = publish_model(tiny_model_dir, olah.mirrors_path, REPO)
        manifest = download_model(repo_id=REPO, revision="main", endpoint=olah.endpoint,
                                  local_dir=model_dir, progress=False)
        endpoint = olah.endpoint
    assert manifest.commit == commit

    queue = f"offline-{uuid.uuid4().hex[:6]}"
    worker = start_worker(model_dir, queue, hf_endpoint=endpoint, default_max_new_tokens="64")
    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue)) as client:
        job_id = client.submit(ChatRequest.model_validate(
            {"messages": TINY_MESSAGES, "params": {"do_sample": False}}))
        result = client.result(job_id, timeout=120)

    assert (result.thinking, result.content) == (TINY_THINKING, TINY_CONTENT)
    assert (result.model_id, result.model_revision) == (REPO, commit)
    assert endpoint.split("//")[1] not in worker.log()  # it never even names the mirror
