"""The worker's Celery app: `celery -A worker.app worker` or `chatqueue-worker run`.

The model is loaded once per worker process at `worker_init` -- the signal the threads pool
fires in the process that runs its tasks -- and held by one engine thread that every task slot
feeds.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.offline import enter_offline_mode

# Before anything imports huggingface_hub or transformers: they read these at import time.
enter_offline_mode()

from celery import Celery, Task  # noqa: E402
from celery.signals import worker_init, worker_shutdown  # noqa: E402

from producer.celery_app import celery_config  # noqa: E402
from producer.errors import JobFailed  # noqa: E402
from producer.schemas import Progress  # noqa: E402
from producer.settings import TASK_NAME  # noqa: E402
from worker.service import WorkerRuntime, run_job  # noqa: E402
from worker.settings import WorkerSettings  # noqa: E402
from worker.startup import start_runtime  # noqa: E402

log = logging.getLogger(__name__)

_runtime: WorkerRuntime | None = None


def create_worker_app(settings: WorkerSettings) -> Celery:
    app = Celery("chatqueue-worker", set_as_current=True)
    app.conf.update(celery_config(settings))
    app.conf.update(
        worker_pool="threads",
        worker_concurrency=settings.concurrency,
        # A job is acknowledged only once it has a result: a worker that dies mid-job leaves
        # it in Redis to be delivered again.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME, bind=True, throws=(JobFailed,))(generate_chat)
    return app


def generate_chat(task: Task, request: Any, submitted_at: float | None = None) -> dict[str, Any]:
    """The task: a thin adapter from Celery to `run_job`."""
    def report(progress: Progress) -> None:
        task.update_state(state="PROGRESS", meta=progress.model_dump())

    result = run_job(current_runtime(), request, job_id=task.request.id,
                     submitted_at=submitted_at, report=report)
    return result.model_dump(mode="json")


def current_runtime() -> WorkerRuntime:
    if _runtime is None:
        raise RuntimeError("the model is not loaded: this process is not a started worker")
    return _runtime


@worker_init.connect
def _load_model_once(sender: Any = None, **_: Any) -> None:
    global _runtime
    pool = getattr(getattr(sender, "pool_cls", None), "__module__", "")
    if pool.endswith("prefork"):
        # CUDA initialised in a prefork parent breaks its children; one process owns the device.
        raise RuntimeError("chatqueue workers run the threads pool (or solo), not prefork")
    _runtime = start_runtime(settings, worker_name=getattr(sender, "hostname", None))


@worker_shutdown.connect
def _stop_engine(**_: Any) -> None:
    if _runtime is not None:
        _runtime.stop()


settings = WorkerSettings()
app = create_worker_app(settings)
