"""The gateway's pure parts: OpenAI requests to jobs, errors naming the OpenAI field, API keys;
the watch over silent streams' results, on a fake Redis."""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

import pytest

from gateway.cli import main
from gateway.openai_api import to_job
from gateway.settings import GatewaySettings, key_matches
from gateway.streaming import ResultWatch
from producer.batches import LineError
from producer.errors import JobFailed
from producer.schemas import MODEL_ID_PATTERN

MESSAGES = [{"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "},
                                         {"type": "text", "text": "there"}]}]


def test_an_openai_request_becomes_a_job():
    options, job = to_job({"model": "org/m", "messages": MESSAGES, "max_tokens": 12,
                           "temperature": 0, "seed": 3, "stream": True,
                           "stream_options": {"include_usage": True},
                           "chat_template_kwargs": {"enable_thinking": False}})

    assert options.stream and options.include_usage and job.model == "org/m"
    assert [(m.role, m.content) for m in job.messages] == [("system", "Be brief."),
                                                           ("user", "Hi \nthere")]
    params = job.params
    assert (params.max_new_tokens, params.do_sample, params.temperature, params.seed,
            params.enable_thinking) == (12, False, None, 3, False)


@pytest.mark.parametrize(("extra", "field", "limit", "value"), [
    pytest.param({"max_tokens": 0}, "max_tokens", 1, "0", id="max-tokens"),
    pytest.param({"max_completion_tokens": 0}, "max_completion_tokens", 1, "0",
                 id="max-completion-tokens"),
    pytest.param({"temperature": 11.0}, "temperature", 10.0, "11.0", id="temperature"),
    pytest.param({"n": 2}, "n", None, None, id="n"),
    pytest.param({"frobnicate": 1}, "frobnicate", None, None, id="unknown-field"),
    pytest.param({"stream": "yes"}, "stream", None, None, id="stream"),
    pytest.param({"model": "../etc"}, "model", MODEL_ID_PATTERN, "'../etc'", id="model"),
])
def test_a_bad_request_names_the_openai_field(extra, field, limit, value):
    with pytest.raises(LineError) as refused:
        to_job({"model": "org/m", "messages": MESSAGES, **extra})
    error = refused.value
    assert (error.param, error.limit, error.value) == (field, limit, value)
    assert error.message.startswith(field) and error.status_code == 400


def test_keys_are_kept_as_digests_and_matched(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# ops\nsha256:{hashlib.sha256(b'from-file').hexdigest()}\n")
    settings = GatewaySettings(api_keys="alpha, beta", api_keys_file=keys_file)
    digests = settings.key_digests()

    assert len(digests) == 3 and all(len(d) == 32 for d in digests)
    assert all(key_matches(k, digests) for k in ("alpha", "beta", "from-file"))
    assert not key_matches("gamma", digests) and not key_matches("", digests)
    assert "alpha" not in repr(settings)


def test_without_a_key_only_loopback_is_served(monkeypatch, capsys):
    for name in ("CHATQUEUE_GATEWAY_API_KEYS", "CHATQUEUE_GATEWAY_API_KEYS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir("/")  # no .env

    assert main(["--host", "0.0.0.0"]) == 2
    assert "no API key" in capsys.readouterr().err
    assert not GatewaySettings(host="::1").listens_beyond_loopback()
    assert GatewaySettings(host="10.0.0.5").listens_beyond_loopback()


class _FakeClient:
    """What ResultWatch uses of AsyncChatQueueClient: .redis.mget and decode_meta."""

    def __init__(self) -> None:
        self.stored: dict[str, str] = {}
        self.reads: list[list[str]] = []
        self.redis = self

    async def mget(self, keys: list[str]) -> list[str | None]:
        self.reads.append(keys)
        return [self.stored.get(key) for key in keys]

    @staticmethod
    def decode_meta(raw: str) -> tuple[str, object]:
        meta = json.loads(raw)
        return meta["status"], meta["result"]


def test_the_result_watch_reads_every_silent_job_in_one_round_trip():
    from producer.schemas import JobError

    failure = JobFailed(JobError(code="invalid_request", field="top_k", message="bad"))

    async def scenario() -> tuple[Any, ...]:
        client = _FakeClient()
        client.stored["celery-task-meta-refused"] = json.dumps(
            {"status": "FAILURE", "result": None})
        client.stored["celery-task-meta-running"] = json.dumps(
            {"status": "PROGRESS", "result": {"phase": "thinking", "tokens": 3}})
        watch = ResultWatch(client, interval_s=0.01)  # type: ignore[arg-type]
        refused, running, queued = (watch.watch(j) for j in ("refused", "running", "queued"))
        await asyncio.wait({refused}, timeout=5)
        pending = (running.done(), queued.done())
        watch.forget("running")
        await watch.aclose()
        return refused, pending, running, client.reads

    import producer.core as core

    original = core.finished_result
    core.finished_result = lambda job_id, state, payload: (_ for _ in ()).throw(failure)
    try:
        refused, pending, running, reads = asyncio.run(scenario())
    finally:
        core.finished_result = original
    assert refused.exception() is failure
    assert pending == (False, False) and running.cancelled()
    assert sorted(reads[0]) == ["celery-task-meta-queued", "celery-task-meta-refused",
                                "celery-task-meta-running"]
