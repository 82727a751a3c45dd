"""Several workers on one Redis: jobs go to the model they name; workers of one model share."""

from __future__ import annotations

import shutil
import uuid
from collections import Counter

import pytest

from chatqueue_dev.models import TINY_CONTENT, TINY_MESSAGES
from producer import ChatQueueClient, ChatRequest, JobFailed, ProducerSettings
from worker.manifest import MANIFEST_NAME, manifest_for_local_dir, write_manifest

pytestmark = pytest.mark.integration


def relabelled(tiny_model_dir, target, repo_id):
    """The tiny model under another repo id: a second model for routing."""
    shutil.copytree(tiny_model_dir, target, ignore=shutil.ignore_patterns(MANIFEST_NAME))
    write_manifest(target, manifest_for_local_dir(target, repo_id=repo_id, revision="test",
                                                  endpoint="local:test"))
    return target


def request(model, **params):
    return ChatRequest.model_validate({"messages": TINY_MESSAGES, "model": model,
                                       "params": {"do_sample": False, **params}})


def test_each_job_runs_on_a_worker_of_the_model_it_names(redis, start_worker, tiny_model_dir,
                                                         tmp_path):
    suffix = uuid.uuid4().hex[:6]
    models = [f"acme/alpha-{suffix}", f"acme/beta-{suffix}"]
    for model in models:
        start_worker(relabelled(tiny_model_dir, tmp_path / model.split("/")[1], model), None)

    with ChatQueueClient(ProducerSettings(broker_url=redis.url, default_model=models[0])) as client:
        jobs = [(model, client.submit(request(model))) for model in models * 3]
        jobs.append((models[0], client.submit(request(None))))  # the producer's default model
        for model, job_id in jobs:
            result = client.result(job_id, timeout=120)
            assert (result.model_id, result.content) == (model, TINY_CONTENT)


def test_two_workers_on_one_queue_both_take_jobs(redis, start_worker, tiny_model_dir):
    queue = f"shared-{uuid.uuid4().hex[:6]}"
    workers = [start_worker(tiny_model_dir, queue, concurrency="1") for _ in range(2)]

    with ChatQueueClient(ProducerSettings(broker_url=redis.url, queue=queue)) as client:
        # Long enough that one single-slot worker cannot take them all before the other does.
        ids = [client.submit(request(None, max_new_tokens=200, ignore_eos=True)) for _ in range(6)]
        served_by = Counter(client.result(job_id, timeout=180).worker_name for job_id in ids)

    # Node names are "<name>@<host>"; both workers of the queue took a share.
    assert {name.split("@")[0] for name in served_by} == {w.name.split("@")[0] for w in workers}


def test_a_job_for_another_model_on_a_shared_queue_is_refused_clearly(redis, tiny_client):
    with pytest.raises(JobFailed) as failed:
        tiny_client.result(tiny_client.submit(request("acme/not-served")))
    assert failed.value.error.field == "model"
    assert "acme/not-served" in failed.value.error.message
