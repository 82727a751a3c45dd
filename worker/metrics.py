"""Prometheus metrics of one worker process: jobs by outcome, tokens, latencies, the model's state.

`WorkerMetrics` owns its own `CollectorRegistry` rather than the process-wide default one, so two
instances (tests, or a process that restarts its runtime) never collide on a metric name, and
`serve()` exposes exactly these metrics plus the process's own (CPU, memory, open files).

Every metric carries a `model` label: a scrape of many workers then splits by model without
relabelling; the device and host come from the scrape target (Prometheus' `instance`). GPU
memory and utilisation are left to NVIDIA's DCGM exporter, which sees what torch does not.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, get_args
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
    start_http_server,
)

from producer.schemas import ChatResult, ErrorCode, FinishReason

log = logging.getLogger(__name__)

# Taken from the contract, so a new finish reason or error code shows up here by itself.
FINISH_OUTCOMES: tuple[str, ...] = get_args(FinishReason)
ERROR_OUTCOMES: tuple[str, ...] = get_args(ErrorCode)
OUTCOMES: tuple[str, ...] = FINISH_OUTCOMES + ERROR_OUTCOMES

# From a job picked up at once to one that waited behind a long backlog.
QUEUE_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# From a few tokens to max_job_seconds' default.
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
# Powers of two up to well past max_batch_size's default (32).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

# Weight of the newest job in the tokens/s average: about the last ten jobs count.
TOKENS_PER_S_ALPHA = 0.2


class WorkerMetrics:
    """What a worker records; every method is safe to call from any task slot's thread."""

    def __init__(self, model_id: str, registry: CollectorRegistry | None = None) -> None:
        self.model_id = model_id
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._tokens_per_s_avg: float | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

        reg = self.registry
        ProcessCollector(registry=reg)
        self._jobs = Counter(
            "chatqueue_jobs",
            "Jobs this worker ended, by outcome: a finish reason or an error code.",
            ("model", "outcome"),
            registry=reg,
        )

        def per_model(kind: Any, name: str, documentation: str, **options: Any) -> Any:
            """One metric of this worker's model: the same label and registry for all."""
            return kind(name, documentation, ("model",), registry=reg, **options).labels(
                model=model_id)

        self._generated_tokens = per_model(
            Counter, "chatqueue_generated_tokens", "Tokens generated (thinking included).")
        self._prompt_tokens = per_model(
            Counter, "chatqueue_prompt_tokens", "Prompt tokens of finished jobs.")
        self._cached_prompt_tokens = per_model(
            Counter, "chatqueue_cached_prompt_tokens",
            "Prompt tokens of finished jobs whose KV came from the prefix cache.")
        self._queue_wait = per_model(
            Histogram, "chatqueue_queue_wait_seconds",
            "From submission to the start of work on the job.", buckets=QUEUE_WAIT_BUCKETS)
        self._batch_wait = per_model(
            Histogram, "chatqueue_batch_wait_seconds",
            "Part of the generation time: a job's wait in the engine for a row in the running "
            "batch. Growing while the device is busy means the worker is at its batch limit.",
            buckets=QUEUE_WAIT_BUCKETS)
        self._first_token = per_model(
            Histogram, "chatqueue_first_token_seconds",
            "From the start of work on a job to its first generated token (prefill and any "
            "wait for a row in the batch).", buckets=QUEUE_WAIT_BUCKETS)
        self._generation = per_model(
            Histogram, "chatqueue_generation_seconds",
            "From the start of work on a job to its result.", buckets=GENERATION_BUCKETS)
        self._batch_size = per_model(
            Histogram, "chatqueue_batch_size",
            "The most jobs a job shared the device with, itself included.",
            buckets=BATCH_SIZE_BUCKETS)
        self._tokens_per_s = per_model(
            Gauge, "chatqueue_tokens_per_second",
            "Per-job decode speed, exponentially averaged over recent jobs; the worker's "
            "throughput is rate(chatqueue_generated_tokens_total).")
        self._model_loaded = per_model(
            Gauge, "chatqueue_model_loaded",
            "1 once the model is loaded and warm, 0 before and after.")
        self._model_load_seconds = per_model(
            Gauge, "chatqueue_model_load_seconds",
            "How long loading the model onto its device took.")
        self._model_info = per_model(
            Info, "chatqueue_model", "The served model's revision and device.")
        self._consuming = per_model(
            Gauge, "chatqueue_consuming",
            "1 while this worker's Celery consumer takes jobs from its queue; 0 before it "
            "starts, while it is stopped or reconnecting, and after its queue was cancelled "
            "(cancel_consumer). Read at each scrape.")

        # Every outcome exists from the first scrape at 0, so rate() and alerts on a rare outcome
        # see a series before it first happens.
        for outcome in OUTCOMES:
            self._jobs.labels(model=model_id, outcome=outcome)
        self._model_loaded.set(0)
        self._consuming.set(0)

    # ------------------------------------------------------------------ recording

    def job_finished(self, result: ChatResult, batch_size: int | None = None) -> None:
        """A job that produced a result (finish reason stop, length, cancelled or timeout)."""
        self._jobs.labels(model=self.model_id, outcome=result.finish_reason).inc()
        self._generated_tokens.inc(result.usage.completion_tokens)
        self._prompt_tokens.inc(result.usage.prompt_tokens)
        self._cached_prompt_tokens.inc(result.usage.cached_prompt_tokens)
        timings = result.timings
        if timings.queue_wait_s is not None:
            self._queue_wait.observe(timings.queue_wait_s)
        if timings.batch_wait_s is not None:
            self._batch_wait.observe(timings.batch_wait_s)
        if timings.first_token_s is not None:
            self._first_token.observe(timings.first_token_s)
        self._generation.observe(timings.generation_s)
        if batch_size is not None:
            self._batch_size.observe(batch_size)
        if result.usage.completion_tokens > 0:
            self._record_tokens_per_s(timings.tokens_per_s)

    def job_failed(self, code: str) -> None:
        """A job that ended with a JobError of this code."""
        if code not in ERROR_OUTCOMES:
            # A label value per unknown string would grow the series without bound.
            log.warning("unknown job error code %r counted as internal_error", code)
            code = "internal_error"
        self._jobs.labels(model=self.model_id, outcome=code).inc()

    def model_loaded(self, seconds: float, *, revision: str = "", device: str = "") -> None:
        """The model is on its device and warm: the worker is ready for jobs."""
        self._model_load_seconds.set(seconds)
        self._model_info.info({"revision": revision, "device": device})
        self._model_loaded.set(1)

    def model_unloaded(self) -> None:
        self._model_loaded.set(0)

    def watch_consuming(self, consuming: Callable[[], bool]) -> None:
        """chatqueue_consuming asks `consuming` at each scrape, so it is never stale."""
        self._consuming.set_function(lambda: 1.0 if consuming() else 0.0)

    def _record_tokens_per_s(self, value: float) -> None:
        with self._lock:
            previous = self._tokens_per_s_avg
            average = (
                value
                if previous is None
                else (TOKENS_PER_S_ALPHA * value + (1 - TOKENS_PER_S_ALPHA) * previous)
            )
            self._tokens_per_s_avg = average
            self._tokens_per_s.set(average)

    # ------------------------------------------------------------------ exposing

    def exposition(self) -> bytes:
        """The text a scrape gets (Prometheus text format)."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serve /metrics from a daemon thread; returns the bound port (port 0 picks a free one).

        Loopback by default: the metrics name the model and the host's load, which is nobody
        else's business unless the operator opens it (compose: 0.0.0.0 in the container,
        published on the host's loopback only).
        """
        if self._server is not None:
            raise RuntimeError(f"metrics are already served on port {self._server.server_port}")
        self._server, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        bound = self._server.server_port
        log.info("serving Prometheus metrics on http://%s:%d/metrics", addr, bound)
        return bound

    def close(self) -> None:
        """Stop serving (a no-op when not serving)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
