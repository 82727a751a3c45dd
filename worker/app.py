"""The worker's Celery app: `celery -A worker.app worker` or `chatqueue-worker run`.

The model is loaded once per worker process at `worker_init` -- the signal the threads pool
fires in the process that runs its tasks -- and held by one engine thread that every task slot
feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from worker.offline import enter_offline_mode

# Before anything imports huggingface_hub or transformers: they read these at import time.
enter_offline_mode()

from celery import Celery, Task, bootsteps, states  # noqa: E402
from celery.exceptions import Ignore, Reject  # noqa: E402
from celery.signals import (  # noqa: E402
    task_postrun,
    worker_init,
    worker_shutdown,
    worker_shutting_down,
)

from producer.celery_app import celery_config  # noqa: E402
from producer.errors import JobFailed  # noqa: E402
from producer.schemas import Progress  # noqa: E402
from producer.settings import TASK_NAME, accepted_key  # noqa: E402
from worker import exit_status  # noqa: E402
from worker.control import ProgressWrite, install_revoke  # noqa: E402
from worker.delivery import CheckedRequest, broker_options  # noqa: E402
from worker.errors import JobInterrupted, ModelNotReady, WorkerMisconfigured  # noqa: E402
from worker.lease import Lease  # noqa: E402
from worker.outcome import job_failed  # noqa: E402
from worker.presence import keep_present  # noqa: E402
from worker.redact import install as redact_logs  # noqa: E402
from worker.result_store import WorkerLoader  # noqa: E402
from worker.service import run_job, task_arguments  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.startup import WorkerRuntime, start_runtime  # noqa: E402
from worker.watchdog import stop_consuming, watch_engine  # noqa: E402

log = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None
_consumer: Any = None  # Celery's consumer while it runs (ConsumerProbe), for the health check
exit_code = exit_status.OK  # what `chatqueue-worker run` exits with once Celery returns


def create_worker_app(settings: WorkerSettings) -> Celery:
    # The loader brings the write-once result backend (worker/result_store.py).
    app = Celery("chatqueue-worker", set_as_current=True, loader=WorkerLoader)
    app.conf.update(celery_config(settings))
    app.conf.update(
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        # A job is acknowledged only once it has a result: a worker that dies mid-job leaves
        # it in Redis to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        **broker_options(settings),
    )
    app.task(name=TASK_NAME, bind=True, throws=(JobFailed,), Request=CheckedRequest)(generate_chat)
    app.steps["consumer"].add(ConsumerProbe)
    # Celery's built-in tasks (celery.accumulate, celery.chord_unlock, celery.map, ...) would
    # run from any message on our queue: this worker knows one task; the rest arrive as
    # unregistered, and Celery drops (acknowledges) them and stores a NotRegistered failure.
    for name in [name for name in app.tasks if name != TASK_NAME]:
        app.tasks.unregister(name)
    return app


class ConsumerProbe(bootsteps.StartStopStep):
    """Knows Celery's consumer while it runs -- started after its task consumer, stopped when
    the consumer stops or restarts (a lost broker) -- so that `consuming()` can tell the health
    check whether this worker takes jobs from its queue."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        global _consumer
        _consumer = parent

    def stop(self, parent: Any) -> None:
        global _consumer
        _consumer = None

    shutdown = stop


def consuming() -> bool:
    """True while the consumer runs and consumes this worker's queue: False after a
    cancel_consumer of it, while the consumer is stopped or reconnecting, and before it starts."""
    consumer = _consumer
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is None:
        return False
    try:
        return bool(task_consumer.consuming_from(settings.serving_queue))
    except Exception:  # a consumer being torn down: not consuming
        return False


def generate_chat(task: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The task: a thin adapter from Celery to `run_job`."""
    job_id = task.request.id
    runtime = current_runtime()
    lease = _claim(runtime, task)
    try:
        arguments = task_arguments(args, kwargs)
    except JobFailed as failed:
        raise job_failed(runtime.metrics, job_id, failed) from None

    try:
        result = run_job(runtime, arguments.request, job_id=job_id,
                         submitted_at=arguments.submitted_at,
                         progress=progress_encoder(task.backend, job_id), lease=lease,
                         batch=arguments.batch)
    except JobInterrupted as interrupted:
        # Back to the queue, to run again from its start here or on another worker.
        raise Reject(str(interrupted), requeue=True) from None
    return result.model_dump(mode="json")


def progress_encoder(backend: Any, job_id: str) -> Callable[[Progress], ProgressWrite]:
    """The job's PROGRESS state as Celery's `update_state` would store it, for the worker's
    relay to write with the job's stream (fenced by its lease, one pipeline for all jobs)
    instead of a Redis transaction per job and report."""
    key = backend.get_key_for_task(job_id)
    key = key.decode() if isinstance(key, bytes) else key
    ttl_s = int(backend.expires or settings.result_ttl_s)

    def encode(progress: Progress) -> ProgressWrite:
        meta = backend._get_result_meta(result=progress.model_dump(), state="PROGRESS",
                                        traceback=None, request=None)
        meta["task_id"] = job_id
        return ProgressWrite(key, backend.encode(meta), ttl_s)

    return encode


def _claim(runtime: WorkerRuntime, task: Task) -> Lease | None:
    """Take the job's lease (worker/lease.py), waiting while another live run holds it; skip a
    job that already has a final result -- delivered again after it ended (its worker died
    before the ack, or it was published twice): its result stands."""
    job_id = task.request.id

    def finished() -> bool:
        meta = task.backend.get_task_meta(job_id, cache=False)
        return meta.get("status") in states.READY_STATES

    if runtime.leases is None:
        lease = None
        done = finished()
    else:
        try:
            lease = runtime.leases.claim(job_id, finished=finished,
                                         stopping=lambda: runtime.drain.draining)
        except JobInterrupted as interrupted:
            raise Reject(str(interrupted), requeue=True) from None
        done = lease is None
    if done:
        log.info("job %s already has a final result: this delivery is skipped", job_id)
        raise Ignore()
    task.request.chatqueue_lease = lease  # released by _release_lease once the result is stored
    return lease


@task_postrun.connect
def _release_lease(task: Any = None, task_id: str | None = None, state: str | None = None,
                   **_: Any) -> None:
    """After Celery stored the job's result (and before the ack): a delivery waiting for the
    lease now finds the result and skips the job."""
    lease = getattr(getattr(task, "request", None), "chatqueue_lease", None)
    if lease is None or _runtime is None or _runtime.leases is None or task_id is None:
        return
    ended = state in states.READY_STATES
    try:
        _runtime.leases.release(lease, record_key=accepted_key(task_id) if ended else None,
                                record_ttl_s=settings.result_ttl_s)
    except Exception as exc:  # it lapses on its own within job_lease_ttl_s
        log.warning("job %s: lease not released (%s)", task_id, exc)


def current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the model is not loaded: this process is not a started worker")
    return _runtime


@worker_init.connect
def _load_model_once(sender: Any = None, **_: Any) -> None:
    global _runtime
    pool = getattr(getattr(sender, "pool_cls", None), "__module__", "")
    try:
        if pool.endswith("prefork"):
            # CUDA initialised in a prefork parent breaks its children; one process owns the
            # device.
            raise WorkerMisconfigured(
                "chatqueue workers run the threads pool (or solo), not prefork")
        _runtime = start_runtime(settings, worker_name=getattr(sender, "hostname", None))
    except Exception as exc:
        # Celery logs an exception raised by a signal receiver and carries on: the worker would
        # say "ready." and fail every job it takes. Exit before the consumer starts instead, so
        # the jobs stay queued for healthy workers (SystemExit is not an Exception: Celery's
        # dispatch lets it through).
        log.critical("worker start failed, exiting before taking any job: %s", exc,
                     exc_info=not isinstance(exc, (ModelNotReady, WorkerMisconfigured)))
        raise SystemExit(exit_status.START_FAILED) from exc
    _runtime.metrics.watch_consuming(consuming)
    watch_engine(_runtime.engine, on_death=_engine_died)
    if _runtime.control is not None:  # GET /v1/models and the gateway's 503 read it
        keep_present(_runtime.control.redis, node=getattr(sender, "hostname", None) or "worker",
                     model_id=settings.model_id, queue=settings.serving_queue,
                     consuming=consuming)


def _engine_died() -> None:
    global exit_code
    exit_code = exit_status.ENGINE_DIED
    if _runtime is not None:
        _runtime.metrics.model_unloaded()  # the health check fails from now on
    log.critical("the engine thread died: this worker stops taking jobs, puts its running jobs "
                 "back in the queue and exits with status %d", exit_status.ENGINE_DIED)
    stop_consuming(exit_status.ENGINE_DIED)


@worker_shutting_down.connect
def _drain(how: str | None = None, **_: Any) -> None:
    """SIGTERM (a warm shutdown): Celery stops taking jobs and waits for the running ones, for
    as long as they take; bound that wait by shutdown_grace_s."""
    if _runtime is not None and how == "Warm":
        _runtime.drain.begin(settings.shutdown_grace_s)


@worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    if _runtime is not None:
        _runtime.stop()


settings = WorkerSettings()
redact_logs(settings.log_content)
app = create_worker_app(settings)
install_revoke(lambda: _runtime.control if _runtime is not None else None)
