"""The delivery settings as Celery and kombu get them, and the drain."""

from __future__ import annotations

import ssl

import pytest
from celery import Celery
from pydantic import ValidationError

from producer.celery_app import celery_config
from worker.delivery import TRANSPORT, broker_options, envelope_headers
from worker.drain import Drain
from worker.engine import EngineJob, EngineRequest
from worker.errors import JobInterrupted
from worker.pipeline.sampling import SamplingParams
from worker.result_store import WorkerLoader, WriteOnceRedisBackend
from worker.settings import WorkerSettings


def worker_settings(**values: object) -> WorkerSettings:
    return WorkerSettings(_env_file=None, **values)


def worker_app(settings: WorkerSettings) -> Celery:
    """The broker and result side of worker.app.create_worker_app: importing worker.app itself
    would put this whole test process in offline mode."""
    app = Celery("delivery-test", set_as_current=False, loader=WorkerLoader)
    app.conf.update(celery_config(settings), **broker_options(settings))
    return app


def test_redelivery_settings_reach_kombu():
    options = broker_options(worker_settings(max_job_seconds=5, visibility_timeout_s=8,
                                             redelivery_check_s=1, job_lease_ttl_s=3,
                                             job_lease_renew_s=1))
    assert options["broker_transport_options"] == {
        "visibility_timeout": 8, "unacked_restore_interval": 1, "unacked_restore_throttle": 1,
        "unacked_mutex_expire": 1,
        "priority_steps": [0, 3, 6, 9],
        # Refused before kombu decodes it: 4 x max_request_bytes + 64 KiB by default.
        "max_message_bytes": 4 * 1_048_576 + 65_536,
    }
    assert options["broker_transport"] == TRANSPORT
    assert options["broker_connection_max_retries"] is None
    assert "broker_use_ssl" not in options


def test_defaults_and_limits(monkeypatch):
    for name in ("CHATQUEUE_SHUTDOWN_GRACE_S", "CHATQUEUE_MAX_MESSAGES"):
        monkeypatch.delenv(name, raising=False)
    settings = worker_settings()
    assert (settings.redelivery_check_s, settings.shutdown_grace_s) == (5.0, 60.0)
    assert (settings.max_request_bytes, settings.max_messages) == (1_048_576, 256)
    monkeypatch.setenv("CHATQUEUE_SHUTDOWN_GRACE_S", "12.5")
    assert worker_settings().shutdown_grace_s == 12.5
    with pytest.raises(ValidationError, match="max_messages"):
        worker_settings(max_messages=257)  # over the contract's own ceiling
    with pytest.raises(ValidationError, match="redelivery_check_s"):
        worker_settings(redelivery_check_s=0)


def test_worker_app_uses_the_write_once_backend_and_the_tolerant_transport():
    app = worker_app(worker_settings(broker_url="redis://127.0.0.1:6399/0",
                                     redis_password="s3cret"))
    assert isinstance(app.backend, WriteOnceRedisBackend)
    connection = app.connection_for_write()
    assert connection.transport_cls == TRANSPORT
    assert not connection.ssl
    assert "s3cret" not in connection.as_uri()


def test_rediss_still_means_tls_and_verified_certificates():
    url = "rediss://redis.example:6380/0"
    app = worker_app(worker_settings(broker_url=f"{url}?ssl_cert_reqs=required"))
    assert app.connection_for_write().ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    # Without options in the URL kombu's own default would be no verification at all.
    plain = worker_app(worker_settings(broker_url=url,
                                       result_backend=f"{url}?ssl_cert_reqs=required"))
    assert plain.connection_for_write().ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    assert isinstance(plain.backend, WriteOnceRedisBackend)


def engine_job() -> EngineJob:
    return EngineJob(request=EngineRequest(prompt_ids=[1], max_new_tokens=1,
                                           sampling=SamplingParams(do_sample=False),
                                           stop_ids=frozenset()))


def test_drain_interrupts_the_running_jobs_after_the_grace():
    drain, running, done = Drain(), engine_job(), engine_job()
    with drain.hold(done):
        pass
    with drain.hold(running):
        drain.abandon()
    # The job did not end: its slot is to get JobInterrupted, not a "cancelled" output to
    # reread. The timer only asks; the engine thread fails the future between steps
    # (tests/unit/test_engine.py runs that part).
    assert isinstance(running.interruption, JobInterrupted)
    assert "grace period" in str(running.interruption)
    assert not running.future.done() and not running.cancelled
    assert done.interruption is None
    late = engine_job()
    with pytest.raises(JobInterrupted), drain.hold(late):
        pass
    assert late.cancelled


def test_drain_fails_interrupted_jobs_itself_when_the_engine_never_gets_to_them():
    # No engine runs these jobs: as if its thread were stuck inside a step.
    drain, stuck = Drain(engine_response_s=0.05), engine_job()
    with drain.hold(stuck):
        drain.abandon()
        with pytest.raises(JobInterrupted, match="grace period"):
            stuck.future.result(timeout=10)


def test_drain_before_its_grace_leaves_jobs_alone():
    drain, job = Drain(), engine_job()
    with drain.hold(job):
        drain.begin(grace_s=3600)
        assert not job.cancelled and not job.future.done()
        drain.cancel_timer()


@pytest.mark.parametrize(
    ("envelope", "expected"),
    [
        pytest.param(b'{"body": "W1tdLCB7fSwge31d", "content-encoding": "utf-8", "headers": '
                     b'{"id": "job-1", "task": "chatqueue.generate_chat"}, "properties": '
                     b'{"delivery_tag": "t"}}',
                     {"id": "job-1", "task": "chatqueue.generate_chat", "delivery_tag": "t"},
                     id="kombu-envelope"),
        pytest.param(b'{"body": "a \\" quote \\\\", "headers": {"id": "j"}}', {"id": "j"},
                     id="escaped-quotes-in-the-body"),
        pytest.param(b"\x00 not json", {}, id="not-an-envelope"),
        pytest.param(b'{"body": "unterminated', {}, id="unterminated-body"),
        pytest.param(b'["body": "x"]', {}, id="not-an-object"),
    ],
)
def test_envelope_headers_are_read_without_the_body(envelope, expected):
    assert envelope_headers(envelope) == expected
