"""WorkerMetrics: what each call records, and what a real scrape over HTTP sees."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from producer.schemas import ChatResult, Timings, Usage
from worker.metrics import OUTCOMES, WorkerMetrics

MODEL = "org/tiny-model"


def make_result(
    *,
    finish_reason: str = "stop",
    prompt_tokens: int = 12,
    completion_tokens: int = 30,
    queue_wait_s: float | None = 0.2,
    batch_wait_s: float | None = None,
    first_token_s: float | None = None,
    generation_s: float = 1.5,
) -> ChatResult:
    now = datetime.now(tz=UTC)
    return ChatResult(
        job_id="job-1",
        model_id=MODEL,
        model_revision="0" * 40,
        thinking="",
        content="hello",
        finish_reason=finish_reason,
        usage=Usage(
            prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, thinking_tokens=0
        ),
        timings=Timings(
            queued_at=None,
            started_at=now,
            finished_at=now,
            queue_wait_s=queue_wait_s,
            batch_wait_s=batch_wait_s,
            first_token_s=first_token_s,
            generation_s=generation_s,
            tokens_per_s=completion_tokens / generation_s,
        ),
        worker_host="test-host",
        device="cpu",
    )


@pytest.fixture
def metrics() -> Iterator[WorkerMetrics]:
    recorder = WorkerMetrics(MODEL, registry=CollectorRegistry())
    yield recorder
    recorder.close()


def value(metrics: WorkerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"model": MODEL, **labels})


def test_every_outcome_is_exported_at_zero_before_any_job(metrics: WorkerMetrics) -> None:
    assert set(OUTCOMES) == {
        "stop",
        "length",
        "cancelled",
        "timeout",
        "invalid_request",
        "limit_exceeded",
        "out_of_memory",
        "internal_error",
        "batch_expired",
        "batch_cancelled",
    }
    for outcome in OUTCOMES:
        assert value(metrics, "chatqueue_jobs_total", outcome=outcome) == 0
    assert value(metrics, "chatqueue_model_loaded") == 0


def test_job_finished_counts_the_outcome_tokens_and_timings(metrics: WorkerMetrics) -> None:
    metrics.job_finished(make_result(batch_wait_s=0.5, first_token_s=0.7), batch_size=4)
    metrics.job_finished(
        make_result(
            finish_reason="length", prompt_tokens=8, completion_tokens=10, queue_wait_s=None
        ),
        batch_size=1,
    )

    assert value(metrics, "chatqueue_jobs_total", outcome="stop") == 1
    assert value(metrics, "chatqueue_jobs_total", outcome="length") == 1
    assert value(metrics, "chatqueue_generated_tokens_total") == 40
    assert value(metrics, "chatqueue_prompt_tokens_total") == 20
    assert value(metrics, "chatqueue_generation_seconds_count") == 2
    assert value(metrics, "chatqueue_generation_seconds_sum") == pytest.approx(3.0)
    # A job submitted without a timestamp has no queue wait to observe.
    assert value(metrics, "chatqueue_queue_wait_seconds_count") == 1
    assert value(metrics, "chatqueue_queue_wait_seconds_sum") == pytest.approx(0.2)
    # A result from a worker that does not report its batch wait is not counted as 0.
    assert value(metrics, "chatqueue_batch_wait_seconds_count") == 1
    assert value(metrics, "chatqueue_batch_wait_seconds_sum") == pytest.approx(0.5)
    assert value(metrics, "chatqueue_first_token_seconds_count") == 1
    assert value(metrics, "chatqueue_first_token_seconds_sum") == pytest.approx(0.7)
    assert value(metrics, "chatqueue_batch_size_count") == 2
    assert value(metrics, "chatqueue_batch_size_bucket", le="2.0") == 1
    assert value(metrics, "chatqueue_batch_size_bucket", le="4.0") == 2


def test_tokens_per_second_is_an_average_over_recent_jobs(metrics: WorkerMetrics) -> None:
    metrics.job_finished(make_result(completion_tokens=100, generation_s=1.0))
    assert value(metrics, "chatqueue_tokens_per_second") == pytest.approx(100.0)
    metrics.job_finished(make_result(completion_tokens=200, generation_s=1.0))
    # Moved toward the new job's 200 tok/s, not onto it.
    assert 100.0 < value(metrics, "chatqueue_tokens_per_second") < 200.0
    # A job that generated nothing says nothing about decode speed.
    before = value(metrics, "chatqueue_tokens_per_second")
    metrics.job_finished(make_result(completion_tokens=0))
    assert value(metrics, "chatqueue_tokens_per_second") == before


@pytest.mark.parametrize(
    ("code", "counted_as"),
    [
        pytest.param("invalid_request", "invalid_request", id="invalid-request"),
        pytest.param("limit_exceeded", "limit_exceeded", id="limit-exceeded"),
        pytest.param("out_of_memory", "out_of_memory", id="out-of-memory"),
        pytest.param("internal_error", "internal_error", id="internal-error"),
        pytest.param("no_such_code", "internal_error", id="unknown-code-bounded"),
    ],
)
def test_job_failed_counts_the_error_code(
    metrics: WorkerMetrics, code: str, counted_as: str
) -> None:
    metrics.job_failed(code)
    assert value(metrics, "chatqueue_jobs_total", outcome=counted_as) == 1
    if code != counted_as:
        assert value(metrics, "chatqueue_jobs_total", outcome=code) is None
    assert value(metrics, "chatqueue_generated_tokens_total") == 0


def test_model_loaded_and_unloaded(metrics: WorkerMetrics) -> None:
    metrics.model_loaded(12.5, revision="abc123", device="cuda:0")
    assert value(metrics, "chatqueue_model_loaded") == 1
    assert value(metrics, "chatqueue_model_load_seconds") == 12.5
    assert value(metrics, "chatqueue_model_info", revision="abc123", device="cuda:0") == 1
    metrics.model_unloaded()
    assert value(metrics, "chatqueue_model_loaded") == 0


def test_instances_do_not_share_metrics() -> None:
    first, second = WorkerMetrics(MODEL), WorkerMetrics(MODEL)
    first.job_failed("internal_error")
    assert value(first, "chatqueue_jobs_total", outcome="internal_error") == 1
    assert value(second, "chatqueue_jobs_total", outcome="internal_error") == 0


def test_a_real_scrape_over_http_shows_the_counters(metrics: WorkerMetrics) -> None:
    metrics.model_loaded(3.0)
    metrics.job_finished(make_result(), batch_size=2)
    metrics.job_failed("limit_exceeded")
    port = metrics.serve(0)  # 0: the OS picks a free port, so parallel runs never clash
    assert port > 0

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()

    assert f'chatqueue_jobs_total{{model="{MODEL}",outcome="stop"}} 1.0' in text
    assert f'chatqueue_jobs_total{{model="{MODEL}",outcome="limit_exceeded"}} 1.0' in text
    assert f'chatqueue_generated_tokens_total{{model="{MODEL}"}} 30.0' in text
    assert f'chatqueue_model_loaded{{model="{MODEL}"}} 1.0' in text
    assert "# TYPE chatqueue_generation_seconds histogram" in text
    assert "process_cpu_seconds_total" in text  # the process's own metrics ride along


def test_serve_twice_is_refused_and_close_stops_serving(metrics: WorkerMetrics) -> None:
    port = metrics.serve(0)
    with pytest.raises(RuntimeError, match="already served"):
        metrics.serve(0)
    metrics.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    metrics.close()  # closing twice is harmless
